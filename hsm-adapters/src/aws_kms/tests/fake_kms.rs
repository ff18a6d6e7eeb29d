//! A scripted KMS endpoint on a loopback port: enough of the JSON protocol
//! for `Encrypt` and `Decrypt`, and failure modes that real KMS produces
//! but moto cannot (throttling, 5xx, hanging).
//!
//! "Encryption" is `base64(json({context, plaintext}))`: not secret, but a
//! blob only "decrypts" under the context it was made with.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use data_encoding::BASE64;
use serde_json::{Value, json};

/// The ARN the fake reports for every key.
pub(super) const ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/fake-key";

/// How the fake answers.
#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// Encrypts and decrypts.
    Normal,
    /// Every request fails with this HTTP status and error code.
    Fail { status: u16, code: &'static str },
    /// `Decrypt` fails with this error code, unless the blob is `allowed`.
    FailDecryptExcept { code: &'static str, allowed: Vec<u8> },
    /// Reads the request and never answers.
    Hang,
}

/// The running fake.
pub(super) struct FakeKms {
    port: u16,
    state: Arc<Mutex<State>>,
}

struct State {
    mode: Mode,
    /// `X-Amz-Target` of every request received.
    requests: Vec<String>,
}

impl FakeKms {
    /// Starts the fake in `Normal` mode.
    pub(super) fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { mode: Mode::Normal, requests: Vec::new() }));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { port, state }
    }

    /// `http://127.0.0.1:<port>`.
    pub(super) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Switches the failure mode.
    pub(super) fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Forgets the requests seen so far.
    pub(super) fn reset_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// Targets of the requests seen (`TrentService.Encrypt`, …).
    pub(super) fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut target = String::new();
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "x-amz-target" => target = value.trim().to_owned(),
                    "content-length" => length = value.trim().parse().unwrap(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mode = {
            let mut state = state.lock().unwrap();
            state.requests.push(target.clone());
            state.mode.clone()
        };
        let request: Value = serde_json::from_slice(&body).unwrap();
        let (status, response) = answer(&mode, &target, &request);
        if matches!(mode, Mode::Hang) {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let body = response.to_string();
        let error_type = response.get("__type").and_then(Value::as_str).unwrap_or("");
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\n\
             content-length: {}\r\nx-amzn-requestid: fake\r\n{}\r\n",
            body.len(),
            if error_type.is_empty() {
                String::new()
            } else {
                format!("x-amzn-errortype: {error_type}\r\n")
            }
        );
        if writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(body.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

fn error(status: u16, code: &str) -> (u16, Value) {
    (status, json!({ "__type": code, "message": format!("fake {code}") }))
}

fn answer(mode: &Mode, target: &str, request: &Value) -> (u16, Value) {
    if let Mode::Fail { status, code } = mode {
        return error(*status, code);
    }
    let context = request.get("EncryptionContext").cloned().unwrap_or(json!({}));
    let context: BTreeMap<String, String> = serde_json::from_value(context).unwrap();
    match target {
        "TrentService.Encrypt" => {
            let plaintext = request["Plaintext"].as_str().unwrap();
            let blob = json!({ "context": context, "plaintext": plaintext }).to_string();
            (200, json!({ "CiphertextBlob": BASE64.encode(blob.as_bytes()), "KeyId": ARN }))
        }
        "TrentService.Decrypt" => {
            let blob =
                BASE64.decode(request["CiphertextBlob"].as_str().unwrap().as_bytes()).unwrap();
            if let Mode::FailDecryptExcept { code, allowed } = mode
                && blob != *allowed
            {
                return error(400, code);
            }
            let Ok(sealed) = serde_json::from_slice::<Value>(&blob) else {
                return error(400, "InvalidCiphertextException");
            };
            let sealed_context: BTreeMap<String, String> =
                serde_json::from_value(sealed["context"].clone()).unwrap_or_default();
            if sealed_context != context {
                return error(400, "InvalidCiphertextException");
            }
            (200, json!({ "Plaintext": sealed["plaintext"], "KeyId": ARN }))
        }
        _ => error(400, "UnknownOperationException"),
    }
}
