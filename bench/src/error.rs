//! One error type for the whole tool: a message for the operator.

/// Something went wrong; the text says what and, where it can, how to fix it.
#[derive(Debug)]
pub(crate) struct BenchError(pub(crate) String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

macro_rules! from_display {
    ($($t:ty),*) => {$(
        impl From<$t> for BenchError {
            fn from(e: $t) -> Self {
                Self(e.to_string())
            }
        }
    )*};
}

from_display!(std::io::Error, reqwest::Error, serde_json::Error, String, &str);

/// The tool's result type.
pub(crate) type Result<T> = std::result::Result<T, BenchError>;

/// `Err(BenchError(format!(…)))`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::BenchError(format!($($arg)*)))
    };
}
pub(crate) use bail;
