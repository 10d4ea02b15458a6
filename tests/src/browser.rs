//! A real headless Chromium driven over WebDriver: Debian's `chromium` and `chromium-driver`,
//! chromedriver started on a free port in a process group of its own (so that dropping the
//! fixture kills it and every browser process it started), a fresh profile per browser.
//!
//! One browser at a time per test process: a browser, a gateway and a simulated fleet per
//! test already fill a small machine, and timing-sensitive pages would fail for want of CPU.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, SemaphorePermit};

/// The browser and its driver, as Debian installs them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// chromedriver, from Debian's `chromium-driver`.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Set to `1` (CI does) to fail instead of skipping when the browser is not installed.
pub const REQUIRE_ENV: &str = "E2E_REQUIRE_BROWSER";

/// How long chromedriver and the browser may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The window the pages are laid out (and screenshotted) in.
const WINDOW: (u32, u32) = (1360, 900);

/// Browsers running at once in this test process.
static RUNNING: Semaphore = Semaphore::const_new(1);

/// A headless Chromium session; dropping it kills chromedriver and the browser.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    pgid: u32,
    _profile: TempDir,
    _turn: SemaphorePermit<'static>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium. When either is not installed: panics if
    /// `E2E_REQUIRE_BROWSER=1`, else prints that the test is skipped and returns `None`.
    pub async fn start() -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            let require = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
            assert!(
                !require,
                "{REQUIRE_ENV}=1 but {} missing: apt-get install chromium chromium-driver",
                missing.join(" and ")
            );
            println!("skipped: install chromium and chromium-driver");
            return None;
        }
        let turn = RUNNING
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let profile = tempfile::Builder::new()
            .prefix("e2e-chromium-")
            .tempdir()
            .expect("create a browser profile directory");
        // chromedriver cannot take port 0: take a free port, release it, hand it over (again
        // with another port in the rare case something else took it meanwhile).
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = profile.path().join("chromedriver.log");
            let mut driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn chromedriver");
            let pgid = driver.id().expect("chromedriver pid");
            let url = format!("http://127.0.0.1:{port}");
            if let Err(e) = wait_ready(&url, &mut driver).await {
                kill_group(pgid);
                last_error = e;
                continue;
            }
            let client =
                match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities(profile.path()))
                    .connect(&url)
                    .await
                {
                    Ok(client) => client,
                    Err(e) => {
                        kill_group(pgid);
                        panic!(
                            "chromedriver could not start {CHROMIUM}: {e}\nchromedriver log:\n{}",
                            tail(&log)
                        );
                    }
                };
            return Some(Browser {
                client,
                driver,
                pgid,
                _profile: profile,
                _turn: turn,
            });
        }
        panic!("chromedriver did not start: {last_error}");
    }

    /// Opens `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page, returns its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The visible text of the first element matching `css` (`None` if there is none).
    pub async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                vec![json!(css)],
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// An attribute of the first element matching `css`.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                vec![json!(css), json!(name)],
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// Waits until the visible text of `css` satisfies `pred`; returns it. Panics after
    /// `timeout` with what the element last showed.
    pub async fn wait_text(
        &self,
        what: &str,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(css).await;
            if let Some(t) = text.as_deref().filter(|t| pred(t)) {
                return t.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: `{css}` shows {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the attribute `name` of `css` satisfies `pred`; returns it.
    pub async fn wait_attr(
        &self,
        what: &str,
        css: &str,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.attr(css, name).await;
            if let Some(v) = value.as_deref().filter(|v| pred(v)) {
                return v.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: `{css}` [{name}] is {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element matching `css` (waiting up to 10 s for it to appear).
    pub async fn click(&self, css: &str) {
        self.element(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces the value of the input matching `css` by typing `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let input = self.element(css).await;
        input
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        input
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Sets the value of `css` as if pasted (for text too long or too special to type).
    pub async fn set_value(&self, css: &str, value: &str) {
        self.element(css).await;
        self.js(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
             e.dispatchEvent(new Event('input', {bubbles: true}));",
            vec![json!(css), json!(value)],
        )
        .await;
    }

    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element `{css}` within 10 s: {e}"))
    }

    /// Resizes the window to `width` x `height` (for a screenshot of a taller page).
    pub async fn resize(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .unwrap_or_else(|e| panic!("resize the window: {e}"));
    }

    /// Writes a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Ends the WebDriver session (the browser quits), then stops chromedriver.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
        kill_group(self.pgid);
        let _ = self.driver.wait().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser's processes are in chromedriver's group: one signal ends them all.
        kill_group(self.pgid);
    }
}

fn capabilities(profile: &Path) -> serde_json::Map<String, Value> {
    let args = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-dev-shm-usage".into(),
        "--hide-scrollbars".into(),
        format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        format!("--user-data-dir={}", profile.join("profile").display()),
    ];
    let caps = json!({
        "browserName": "chrome",
        // The gateway's generated development certificate: trusted for this session only.
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
    });
    caps.as_object().expect("an object").clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls chromedriver's `/status` until it is ready.
async fn wait_ready(url: &str, driver: &mut Child) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("HTTP client");
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = driver.try_wait() {
            return Err(format!("chromedriver exited: {status}"));
        }
        if let Ok(resp) = http.get(format!("{url}/status")).send().await {
            if let Ok(body) = resp.json::<Value>().await {
                if body["value"]["ready"] == json!(true) {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("not ready within {START_TIMEOUT:?}"))
}

fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
