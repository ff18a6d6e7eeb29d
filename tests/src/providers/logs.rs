//! Capturing every log line of the test process (tracing events at TRACE
//! level from all crates, and `log` records such as cryptoki's) so tests
//! can assert that secrets never appear in them.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// The process-wide log capture.
#[derive(Clone)]
pub struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
}

impl Logs {
    /// Installs the capture as the global subscriber (once per process) and
    /// returns it. Panics if another global subscriber was installed first.
    pub fn capture() -> Self {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs { buffer: Arc::new(Mutex::new(Vec::new())) };
            tracing_subscriber::fmt()
                .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
                .with_ansi(false)
                .with_writer(logs.clone())
                .try_init()
                .expect("the log capture must be the process's only global subscriber");
            logs
        })
        .clone()
    }

    /// Everything logged so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }

    /// Asserts that the log contains `needle`.
    pub fn assert_contains(&self, needle: &str) {
        let contents = self.contents();
        assert!(contents.contains(needle), "the log lacks {needle:?}:\n{contents}");
    }

    /// Asserts that no secret occurs in the log (which must not be empty,
    /// or the assertion would prove nothing).
    pub fn assert_free_of(&self, secrets: &[&str]) {
        let contents = self.contents();
        assert!(!contents.is_empty(), "nothing was logged; is the capture installed?");
        for secret in secrets {
            assert!(!contents.contains(secret), "a secret appears in the log");
        }
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl io::Write for Logs {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
