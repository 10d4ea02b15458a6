//! The operator API key generated on first start: kept beside the database, printed once.

use e2e::{assert_api_error, Api, Gateway, Options};

#[tokio::test]
async fn generated_api_key_is_kept_printed_once_and_reused() {
    let gw = Gateway::start(Options::new().generated_api_key()).await;
    let key_file = gw.dir().join("data").join("api-key");
    assert!(
        key_file.exists(),
        "no {} after first start",
        key_file.display()
    );
    let key = std::fs::read_to_string(&key_file)
        .expect("read api-key")
        .trim()
        .to_string();
    assert!(key.len() >= 20, "generated key {key:?} is too short");

    let api = Api::new(&gw.api_url, &gw.root_url, Some(&key));
    api.get("/devices").await.expect(200);
    assert_api_error(
        &api.with_key(Some("not-the-key")).get("/devices").await,
        401,
        "unauthorized",
    );

    let stderr = gw.stderr();
    assert_eq!(
        stderr.matches(key.as_str()).count(),
        1,
        "the key must appear exactly once on stderr:\n{stderr}"
    );
    assert!(
        gw.stdout_lines().iter().all(|l| !l.contains(&key)),
        "the key was printed on stdout"
    );

    let gw = gw.restart().await;
    let after = std::fs::read_to_string(&key_file).expect("read api-key after restart");
    assert_eq!(after.trim(), key, "the key file changed on restart");
    let api = Api::new(&gw.api_url, &gw.root_url, Some(&key));
    api.get("/devices").await.expect(200);
    let stderr = gw.stderr();
    assert!(
        !stderr.contains(&key),
        "the key was printed again on restart:\n{stderr}"
    );
}

#[tokio::test]
async fn stdout_holds_only_the_listening_line() {
    let gw = Gateway::start(Options::new()).await;
    let token = gw.create_device("sensor-1").await;
    let dev = gw.connect(&token).await;
    dev.close().await;
    let stopped = gw.terminate().await;
    assert!(stopped.status.success(), "exit status {}", stopped.status);
    // The fixture parsed the first line strictly; nothing else may follow it.
    assert_eq!(stopped.stdout.len(), 1, "stdout: {:?}", stopped.stdout);
    assert!(stopped.stdout[0].starts_with("listening device=wss://127.0.0.1:"));
}
