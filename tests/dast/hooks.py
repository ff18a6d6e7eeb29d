"""Schemathesis hooks for keygate's DAST run (tests/tests/dast.rs).

Adds one check: no response carries a stack trace, a panic message or
Rust debug output (what an API must never show its clients).
"""

import schemathesis

MARKERS = (
    "panicked at",
    "stack backtrace",
    "RUST_BACKTRACE",
    "Traceback (most recent call last)",
    "Os { code:",
    "Error { kind:",
    "thread '",
)


@schemathesis.check
def no_debug_output(ctx, response, case):
    """Responses never contain stack traces, panics or Rust Debug dumps."""
    text = response.text or ""
    for marker in MARKERS:
        if marker in text:
            raise AssertionError(f"the response contains debug output ({marker!r})")
