//! The web console: static pages built into the binary (`gateway/console/`), served at `/`
//! and `/console/*` without a key. The pages call the `/v1` API with the key the operator
//! signs in with, so nothing here needs one: the files hold no data and no secret.
//!
//! Every file goes out with a strict Content-Security-Policy (scripts from this origin
//! only: no inline script, no `eval`), so that even a bug that put device data into the
//! page as markup could not run it. `connect-src` names the device listener (any host, its
//! port and scheme) for the browser device page, which connects there as a device.

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiState};

/// Where devices connect: the device listener's bound address and whether it speaks TLS.
#[derive(Debug, Clone, Copy)]
pub struct DeviceEndpoint {
    /// `wss://` when true, `ws://` with `--no-tls`.
    pub tls: bool,
    /// The bound address (an unspecified IP means "the host the browser used").
    pub addr: SocketAddr,
}

impl DeviceEndpoint {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "wss"
        } else {
            "ws"
        }
    }

    /// The host to show in the device URL, `None` when the listener is on every address.
    fn host(&self) -> Option<String> {
        match self.addr {
            a if a.ip().is_unspecified() => None,
            SocketAddr::V4(a) => Some(a.ip().to_string()),
            SocketAddr::V6(a) => Some(format!("[{}]", a.ip())),
        }
    }
}

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// The files under `/console/`; `index.html` is also `/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("events.js", JS),
    asset!("fleet.js", JS),
    asset!("device.js", JS),
    asset!("chart.js", JS),
    asset!("browser-device.js", JS),
];

/// The console's routes, outside `/v1` and outside the OpenAPI document (they are pages,
/// not API); unknown names under `/console/` are the API's usual 404.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/console/config.json", get(config))
        .route("/console/{file}", get(file))
        .with_state(state)
}

async fn index(State(state): State<ApiState>) -> Response {
    serve(&ASSETS[0], &state.device_endpoint)
}

async fn file(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset, &state.device_endpoint),
        None => ApiError::not_found("no such route").into_response(),
    }
}

/// `GET /console/config.json`: what the browser device page needs to find the device
/// listener (`host` is null when it listens on every address: use the page's host).
async fn config(State(state): State<ApiState>) -> Response {
    let endpoint = state.device_endpoint;
    let body = Json(json!({
        "device": {
            "scheme": endpoint.scheme(),
            "host": endpoint.host(),
            "port": endpoint.addr.port(),
            "path": "/v1/connect",
        },
        "version": env!("CARGO_PKG_VERSION"),
    }));
    (security_headers(&endpoint), body).into_response()
}

fn serve(asset: &Asset, endpoint: &DeviceEndpoint) -> Response {
    (
        security_headers(endpoint),
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

/// The policy: nothing but this origin's files, its API and the device listener.
pub fn content_security_policy(endpoint: &DeviceEndpoint) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' {}://*:{}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        endpoint.scheme(),
        endpoint.addr.port()
    )
}

fn security_headers(endpoint: &DeviceEndpoint) -> [(HeaderName, HeaderValue); 5] {
    let csp =
        HeaderValue::from_str(&content_security_policy(endpoint)).expect("the policy is ASCII");
    [
        (header::CONTENT_SECURITY_POLICY, csp),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // Small files: revalidating costs nothing and an upgraded gateway serves its own.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (state, _writer) = crate::api::test_state(dir.path()).await;
        let router = crate::api::router(state);
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    fn header<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_is_served_at_the_root_with_a_strict_policy() {
        let (status, headers, body) = get("/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        let csp = header(&headers, "content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self';",
            "style-src 'self';",
            "connect-src 'self' wss://*:8443;",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{directive} missing in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(String::from_utf8(body).unwrap().contains("/console/app.js"));
    }

    #[tokio::test]
    async fn each_file_has_its_content_type_and_the_headers() {
        for (path, content_type) in [
            ("/console/index.html", "text/html; charset=utf-8"),
            ("/console/app.js", "text/javascript; charset=utf-8"),
            ("/console/events.js", "text/javascript; charset=utf-8"),
            ("/console/style.css", "text/css; charset=utf-8"),
            ("/console/icon.svg", "image/svg+xml"),
        ] {
            let (status, headers, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(header(&headers, "content-type"), content_type, "{path}");
            assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
            assert!(headers.contains_key("content-security-policy"), "{path}");
            assert!(!body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn unknown_paths_are_still_the_apis_404() {
        for path in [
            "/console/nope.js",
            "/console/",
            "/nope",
            "/v1/nope",
            "/index.html",
        ] {
            let (status, headers, body) = get(path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(
                header(&headers, "content-type").starts_with("application/json"),
                "{path}"
            );
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], "not_found", "{path}");
        }
    }

    #[tokio::test]
    async fn the_config_names_the_device_listener() {
        let (status, _, body) = get("/console/config.json").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["device"],
            json!({"scheme": "wss", "host": null, "port": 8443, "path": "/v1/connect"})
        );
        let plain = DeviceEndpoint {
            tls: false,
            addr: "[::1]:9000".parse().unwrap(),
        };
        assert_eq!(plain.host().as_deref(), Some("[::1]"));
        assert!(content_security_policy(&plain).contains("connect-src 'self' ws://*:9000;"));
    }

    /// Every file a page or module names is served, and every served file is used.
    #[test]
    fn the_files_reference_each_other_completely() {
        let mut referenced = vec!["index.html".to_string()];
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).unwrap();
            for marker in ["\"/console/", "from './"] {
                for part in text.split(marker).skip(1) {
                    let name = part.split(['"', '\'']).next().unwrap();
                    referenced.push(name.to_string());
                }
            }
        }
        for name in &referenced {
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "{name} is referenced but not served"
            );
        }
        for asset in ASSETS {
            assert!(
                referenced.iter().any(|n| n == asset.name),
                "{} is served but never used",
                asset.name
            );
        }
    }

    /// Device data must never be parsed as markup or code: none of the APIs that would.
    #[test]
    fn no_file_parses_strings_as_markup_or_code() {
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).unwrap();
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "setTimeout('",
                "style=\"",
                "javascript:",
            ] {
                assert!(!text.contains(banned), "{} uses {banned}", asset.name);
            }
        }
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert_eq!(index.matches("<script").count(), 1, "one script, by src");
        assert!(index.contains(r#"<script type="module" src="/console/app.js"></script>"#));
    }
}
