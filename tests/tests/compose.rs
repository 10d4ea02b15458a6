//! The docker-compose demo, for real: builds the image from the repository's `Dockerfile`,
//! brings `docker-compose.yml` up under a project name of its own on free loopback ports, checks
//! it from the host through the operator API and the published device port, then `down -v`.
//!
//! Needs a Docker engine and the images the `Dockerfile` names, which `tests/compose/run.sh`
//! makes on a machine without a registry; it runs this test with `--ignored`:
//!
//! ```sh
//! tests/compose/run.sh
//! ```
//!
//! `RUST_IMAGE` names the builder image (default `rust:1-bookworm`, as for users).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::{eventually, json, Api, ConnectRequest, Value};

/// The default fleet of the compose file, and what its `large` profile adds.
const FLEET: usize = 20;
const LARGE_FLEET: usize = 1000;
const ONLINE_TIMEOUT: Duration = Duration::from_secs(120);

/// One compose project: its name, its image, and `docker-compose` run in the repository.
struct Project {
    name: String,
    image: String,
    root: PathBuf,
    compose: Vec<String>,
}

impl Project {
    fn new() -> Project {
        let id = std::process::id();
        // `docker compose` (v2) where the plugin exists, else `docker-compose` (v1.29).
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let compose = if v2 {
            vec!["docker".to_string(), "compose".to_string()]
        } else {
            vec!["docker-compose".to_string()]
        };
        Project {
            name: format!("gwcompose{id}"),
            image: format!("iot-gateway-compose-test-{id}"),
            root: Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_path_buf(),
            compose,
        }
    }

    /// `docker-compose -p NAME ARGS...` in the repository, with this project's settings.
    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .args(["-p", &self.name])
            .args(args)
            .current_dir(&self.root)
            .env("GATEWAY_IMAGE", &self.image)
            // Free ports on the host's loopback: never a fixed port.
            .env("DEVICE_BIND", "127.0.0.1")
            .env("DEVICE_PORT", "")
            .env("API_PORT", "")
            .env("FLEET", FLEET.to_string())
            .env("LARGE_FLEET", LARGE_FLEET.to_string());
        let out = cmd.output().expect("run docker-compose");
        if !out.status.success() {
            panic!(
                "{} {args:?} failed: {}\n{}\n{}",
                self.compose.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn compose_stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.compose(args).stdout)
            .trim()
            .to_string()
    }

    /// The host address a service's container port is published on.
    fn published(&self, service: &str, port: u16) -> String {
        let addr = self.compose_stdout(&["port", service, &port.to_string()]);
        assert!(
            addr.starts_with("127.0.0.1:"),
            "{service}:{port} published on {addr:?}, not on the loopback"
        );
        addr
    }

    /// The id of a service's container.
    fn container(&self, service: &str) -> String {
        let id = self.compose_stdout(&["ps", "-q", service]);
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn logs(&self) -> String {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .args(["-p", &self.name, "logs", "--no-color", "--tail", "40"])
            .current_dir(&self.root)
            .env("GATEWAY_IMAGE", &self.image);
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("compose logs:\n{}", self.logs());
        }
        // Whatever happened: no containers, volume or image of the test left behind.
        let _ = Command::new(&self.compose[0])
            .args(&self.compose[1..])
            .args(["-p", &self.name, "--profile", "large", "down", "-v"])
            .current_dir(&self.root)
            .env("GATEWAY_IMAGE", &self.image)
            .output();
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.image])
            .output();
        // The legacy builder keeps the build stage as a dangling image.
        let _ = Command::new("docker")
            .args([
                "image",
                "prune",
                "-f",
                "--filter",
                "label=iot-gateway.stage=build",
            ])
            .output();
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every online device, through the API (pages of 1,000).
async fn online(api: &Api) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/devices?online=true&limit=1000&cursor={c}"),
            None => "/devices?online=true&limit=1000".to_string(),
        };
        let page = api.get(&path).await.expect(200);
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return items,
        }
    }
}

async fn wait_online(api: &Api, want: usize) -> Duration {
    let start = Instant::now();
    eventually(
        &format!("{want} devices online"),
        ONLINE_TIMEOUT,
        || async { (online(api).await.len() == want).then_some(()) },
    )
    .await;
    start.elapsed()
}

#[tokio::test]
#[ignore = "needs a Docker engine and local base images: run tests/compose/run.sh"]
async fn the_compose_demo_runs_a_fleet_that_stores_telemetry_and_answers_commands() {
    let started = Instant::now();
    let project = Project::new();
    let rust_image = std::env::var("RUST_IMAGE").unwrap_or_else(|_| "rust:1-bookworm".into());

    // The image, as a user builds it: `docker-compose build` on the repository's Dockerfile.
    project.compose(&["build", "gateway"]);
    let config: Value =
        serde_json::from_str(&docker(&["image", "inspect", &project.image])).unwrap();
    let config = &config[0]["Config"];
    assert_eq!(
        config["User"], "gateway",
        "the image runs as a non-root user"
    );
    assert!(
        config["Volumes"].get("/data").is_some(),
        "/data is a volume: {}",
        config["Volumes"]
    );
    let health = config["Healthcheck"]["Test"].to_string();
    assert!(health.contains("/healthz"), "healthcheck {health}");
    for binary in ["gateway", "device-sim"] {
        let version = docker(&[
            "run",
            "--rm",
            "--entrypoint",
            binary,
            &project.image,
            "--version",
        ]);
        assert!(version.starts_with(binary), "{binary} --version: {version}");
    }
    let built = started.elapsed();

    // Up: the gateway, then (once healthy) the fleet, which provisions itself.
    project.compose(&["up", "-d"]);
    let gateway = project.container("gateway");
    assert_eq!(
        docker(&["exec", &gateway, "id", "-u"]),
        "10001",
        "the gateway runs as uid 10001"
    );
    let api_addr = project.published("gateway", 8080);
    let key = docker(&["exec", &gateway, "cat", "data/api-key"]);
    let api = Api::new(
        &format!("http://{api_addr}/v1"),
        &format!("http://{api_addr}"),
        Some(&key),
    );
    let up = wait_online(&api, FLEET).await;
    let health = docker(&["inspect", "-f", "{{.State.Health.Status}}", &gateway]);
    assert_eq!(
        health, "healthy",
        "docker's view of the /healthz healthcheck"
    );
    let ready = api.get_root("/readyz").await.expect(200);
    assert_eq!(ready["online_devices"], FLEET);

    // Telemetry stored for every device of the fleet.
    let devices = online(&api).await;
    for d in &devices {
        let id = d["id"].as_str().unwrap();
        assert!(id.starts_with("sim-"), "fleet device {id}");
        let path = format!("/devices/{id}/telemetry/latest");
        eventually(&format!("telemetry of {id}"), ONLINE_TIMEOUT, || async {
            (api.get(&path).await.status == 200).then_some(())
        })
        .await;
    }

    // A command from the host, answered by a simulated device.
    let target = devices[3]["id"].as_str().unwrap();
    let cmd = api
        .post(
            &format!("/devices/{target}/commands"),
            &json!({"name": "ping", "params": {"from": "host"}, "wait_s": 10}),
        )
        .await
        .expect(201);
    assert_eq!(cmd["status"], "succeeded", "command {cmd}");
    assert_eq!(cmd["result"]["pong"], true, "command {cmd}");

    // The published device port, from the host: a device of our own, TLS checked against the
    // development CA the gateway made in its volume (its certificate names the host `gateway`).
    let device_addr = project.published("gateway", 8443);
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, docker(&["exec", &gateway, "cat", "certs/ca.pem"])).unwrap();
    let created = api
        .post("/devices", &json!({"id": "host-device"}))
        .await
        .expect(201);
    let mut dev = ConnectRequest::new(&format!("wss://{device_addr}/v1/connect"), &ca)
        .server_name("gateway")
        .bearer(created["token"].as_str().unwrap())
        .send()
        .await
        .device();
    dev.send_acked(&json!({"type": "telemetry", "id": "from-host", "data": {"temp": 21.5}}))
        .await;
    let latest = api
        .get("/devices/host-device/telemetry/latest")
        .await
        .expect(200);
    assert_eq!(latest["data"]["temp"], 21.5);
    dev.close().await;

    // The large profile adds its fleet to the running demo.
    project.compose(&["--profile", "large", "up", "-d"]);
    let large_up = wait_online(&api, FLEET + LARGE_FLEET).await;

    // Stop: the gateway ends on SIGTERM with exit 0 (everything acked is kept), then `down -v`
    // leaves no container and no volume.
    project.compose(&["--profile", "large", "stop"]);
    let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &gateway]);
    assert_eq!(exit, "0", "the gateway's exit code after docker stop");
    project.compose(&["--profile", "large", "down", "-v"]);
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
    ]);
    assert!(left.is_empty(), "containers left after down -v: {left}");
    let volumes = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
    ]);
    assert!(volumes.is_empty(), "volumes left after down -v: {volumes}");

    println!(
        "compose demo: image built in {:.1}s (builder {rust_image}); {FLEET} devices online {:.1}s \
         after up, telemetry stored for each, ping answered ({}), a host device acked; \
         large profile {} online {:.1}s after up; exit 0 on stop; down -v clean; {:.1}s in all",
        built.as_secs_f64(),
        up.as_secs_f64(),
        cmd["result"],
        FLEET + LARGE_FLEET,
        large_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
