//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`) driven through
//! the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by a NUL
//! byte, commands on the browser's fd 3 and answers on its fd 4), so a test loads a page, sets
//! the viewport (a phone's too: a headless window is at least 500 px wide), reads the live DOM
//! with script and takes screenshots without a WebSocket client.
//!
//! Bounded: every command waits at most [`COMMAND_LIMIT`]; the browser runs in a process group
//! of its own, killed by its PID when the `Browser` is dropped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The longest one DevTools command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// How long a closed browser may take to exit before it is killed.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// The browser binary, or a message saying how to get it.
pub fn chromium() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "chromium is not installed: run `cargo xtask setup` (it installs Debian's chromium \
             package; CI does this)"
                .to_string()
        })
}

/// One headless browser with one page open.
pub struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: Receiver<Value>,
    next_id: u64,
    /// The page's DevTools session, once a page is open.
    session: Option<String>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `binary` headless with a fresh profile.
    pub fn launch(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("browser profile directory");
        let log = profile.path().join("chromium.log");
        let stderr = std::fs::File::create(&log).expect("browser log");
        // The shell puts the pipes on fds 3 and 4, where the browser expects them, and execs
        // it (so the PID is the browser's).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--mute-audio",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let commands = child.stdin.take().expect("browser's command pipe");
        let output = child.stdout.take().expect("browser's answer pipe");
        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                message.pop_if(|b| *b == 0);
                let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                    continue;
                };
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        Browser {
            child,
            commands,
            answers,
            next_id: 1,
            session: None,
            log,
            _profile: profile,
        }
    }

    /// Sends one command (to the open page, if any) and returns its result; panics with the
    /// browser's log on an error or after [`COMMAND_LIMIT`].
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("serialize command");
        bytes.push(0);
        if let Err(error) = self.commands.write_all(&bytes) {
            panic!(
                "{method}: cannot write to chromium: {error}{}",
                self.log_text()
            );
        }
        let deadline = Instant::now() + COMMAND_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = match self.answers.recv_timeout(left) {
                Ok(answer) => answer,
                Err(error) => panic!(
                    "{method}: no answer from chromium ({error}){}",
                    self.log_text()
                ),
            };
            // Events (no id) and answers to others are not ours.
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("{method}: chromium refused: {error}");
            }
            return answer["result"].clone();
        }
    }

    /// Opens a page on `url` and waits until it has loaded.
    pub fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].clone();
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        self.session = Some(
            attached["sessionId"]
                .as_str()
                .expect("a DevTools session id")
                .to_string(),
        );
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for("document.readyState === 'complete'", COMMAND_LIMIT);
    }

    /// The open page's viewport as a device `width` × `height` CSS pixels wide (`mobile`: a phone's
    /// meta-viewport handling).
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// The value of a script expression in the page.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(thrown) = result.get("exceptionDetails") {
            panic!("script {expression:?} threw: {thrown}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `condition` (a script expression) is true; panics after `limit`.
    pub fn wait_for(&mut self, condition: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.eval(condition) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "the page did not get to {condition:?} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64_decode(data).expect("screenshot in base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("\nchromium's log:\n{text}")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session = None;
        let close = json!({ "id": 0, "method": "Browser.close" });
        let _ = self
            .commands
            .write_all(format!("{close}\0").as_bytes())
            .and_then(|()| self.commands.flush());
        let deadline = Instant::now() + EXIT_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The browser's helpers (renderer, zygote) are in its group: none is left behind.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshots DevTools sends), or `None` if `text` is not.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let symbols: Vec<u8> = text.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(symbols.len() * 3 / 4);
    for chunk in symbols.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}
