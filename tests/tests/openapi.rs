//! The OpenAPI document at `/v1/openapi.json`: served without a key, OpenAPI 3, every route of the contract in it.

use e2e::{Gateway, Options};

#[tokio::test]
async fn the_document_lists_every_operation_of_the_contract() {
    let gw = Gateway::start(Options::new()).await;
    let doc = gw
        .api()
        .with_key(None)
        .get("/openapi.json")
        .await
        .expect(200);
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in [
        ("post", "/v1/devices"),
        ("get", "/v1/devices"),
        ("get", "/v1/devices/{id}"),
        ("patch", "/v1/devices/{id}"),
        ("delete", "/v1/devices/{id}"),
        ("post", "/v1/devices/{id}/token"),
        ("get", "/v1/devices/{id}/telemetry"),
        ("get", "/v1/devices/{id}/telemetry/latest"),
        ("post", "/v1/devices/{id}/commands"),
        ("get", "/v1/devices/{id}/commands"),
        ("get", "/v1/commands/{command_id}"),
        ("post", "/v1/commands/{command_id}/cancel"),
        ("get", "/v1/devices/{id}/sessions"),
        ("get", "/v1/events"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ] {
        let op = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(op.is_object(), "{method} {path} missing");
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        assert_eq!(
            secured,
            path.starts_with("/v1/"),
            "{method} {path}: the API key is needed exactly under /v1"
        );
    }
    let create = &paths["/v1/devices/{id}/commands"]["post"]["responses"];
    for status in ["200", "201", "202", "404", "422", "429"] {
        assert!(create[status].is_object(), "command create lacks {status}");
    }
    let command = &doc["components"]["schemas"]["Command"]["properties"];
    for field in e2e::commands::COMMAND_FIELDS {
        assert!(command[field].is_object(), "Command.{field} missing");
    }
}
