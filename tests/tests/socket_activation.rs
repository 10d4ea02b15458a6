//! A device socket handed over by a service manager (systemd socket activation, `LISTEN_FDS`):
//! the gateway serves on it, and a device that connects while the gateway restarts is not
//! refused but waits in the accept queue and is served by the next process.

use std::sync::Arc;
use std::time::Duration;

use e2e::{eventually, Gateway, Options};

/// How long the device's connect may wait in the accept queue before the test looks.
const QUEUED: Duration = Duration::from_millis(500);

fn port_of(url: &str) -> u16 {
    let authority = url
        .strip_prefix("wss://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("not a wss:// URL: {url}"));
    authority
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

#[tokio::test]
async fn a_device_connecting_during_a_restart_waits_for_the_next_process() {
    let socket = Arc::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = socket.local_addr().expect("local address").port();
    let gw = Gateway::start(Options::new().device_socket(socket.clone())).await;
    assert_eq!(
        port_of(&gw.device_url),
        port,
        "the listening line shows the socket handed over, not --device-addr 127.0.0.1:0"
    );
    assert!(
        gw.stderr().contains("handed over by the service manager"),
        "the log says where the listener came from:\n{}",
        gw.stderr()
    );
    let token = gw.create_device("sock-1").await;
    let first = gw.connect(&token).await;
    let first_session = first.session_id().to_owned();

    // The gateway stops; the socket (held by this test, as by systemd) stays open.
    let stopped = gw.terminate().await;
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let url = format!("wss://127.0.0.1:{port}/v1/connect");
    let request = e2e::ConnectRequest::new(&url, &stopped.dir.path().join("certs/ca.pem"))
        .bearer(&token)
        .protocols(["iot-gateway.v1"]);
    let pending = tokio::spawn(request.send());
    tokio::time::sleep(QUEUED).await;
    assert!(
        !pending.is_finished(),
        "with no process serving the socket, the connect neither fails nor completes"
    );

    let gw = stopped.start().await;
    assert_eq!(port_of(&gw.device_url), port);
    let second = pending.await.expect("connect task").device();
    assert_ne!(second.session_id(), first_session, "a new session");
    let api = gw.api();
    eventually("the device shows online", Duration::from_secs(10), || {
        let api = api.clone();
        async move {
            let device = api.device("sock-1").await;
            (device["online"] == true).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_socket_promised_but_missing_is_a_startup_error() {
    // LISTEN_FDS=1 with nothing open at descriptor 3: the gateway refuses to start, clearly.
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = tokio::process::Command::new(e2e::gateway::gateway_bin())
        .current_dir(dir.path())
        .args(["--device-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("LISTEN_FDS", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run the gateway");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("socket 0 from the service manager (LISTEN_FDS)"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no listening line: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}
