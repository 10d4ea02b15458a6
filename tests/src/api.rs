//! A small client for the operator HTTP API: every call returns status, headers and the JSON body.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};

/// An operator API client bound to one gateway (and one API key, or none).
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    root: String,
    key: Option<String>,
}

/// One API response.
#[derive(Debug)]
pub struct Resp {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body as text.
    pub raw: String,
    /// The body as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

impl Resp {
    /// Asserts the status and returns the JSON body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "expected HTTP {status}, got {} with body {}",
            self.status, self.raw
        );
        self.body
    }
}

impl Api {
    /// A client for `base` (`http://…/v1`) and `root` (`http://…`) sending `key` as the bearer.
    pub fn new(base: &str, root: &str, key: Option<&str>) -> Api {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("build HTTP client");
        Api {
            client,
            base: base.to_string(),
            root: root.to_string(),
            key: key.map(str::to_string),
        }
    }

    /// The same client with another API key (or none).
    pub fn with_key(&self, key: Option<&str>) -> Api {
        Api {
            key: key.map(str::to_string),
            ..self.clone()
        }
    }

    /// `GET /v1{path}` (`path` may carry a query string).
    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, &self.url(path), None).await
    }

    /// `POST /v1{path}` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        let bytes = serde_json::to_vec(body).expect("serialize body");
        self.send(Method::POST, &self.url(path), Some(bytes)).await
    }

    /// `POST /v1{path}` with raw bytes sent as `application/json`.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Resp {
        self.send(Method::POST, &self.url(path), Some(body)).await
    }

    /// `PATCH /v1{path}` with a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> Resp {
        let bytes = serde_json::to_vec(body).expect("serialize body");
        self.send(Method::PATCH, &self.url(path), Some(bytes)).await
    }

    /// `PATCH /v1{path}` with raw bytes sent as `application/json`.
    pub async fn patch_raw(&self, path: &str, body: Vec<u8>) -> Resp {
        self.send(Method::PATCH, &self.url(path), Some(body)).await
    }

    /// `DELETE /v1{path}`.
    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, &self.url(path), None).await
    }

    /// `GET {root}{path}` without `/v1` (health endpoints); sends the key only if this client has one.
    pub async fn get_root(&self, path: &str) -> Resp {
        self.send(Method::GET, &format!("{}{path}", self.root), None)
            .await
    }

    /// Creates a device (asserting `201`) and returns its token.
    pub async fn create_device(&self, id: &str) -> String {
        let body = self
            .post(
                "/devices",
                &json!({ "id": id, "name": format!("test {id}") }),
            )
            .await
            .expect(201);
        body["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in create response {body}"))
            .to_string()
    }

    /// `GET /v1/devices/{id}`, asserting `200`.
    pub async fn device(&self, id: &str) -> Value {
        self.get(&format!("/devices/{id}")).await.expect(200)
    }

    /// Every telemetry item of a device for `query` (e.g. `order=asc`), following `next_cursor`
    /// pages of 1000 to the end.
    pub async fn telemetry_all(&self, device: &str, query: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let mut path = format!("/devices/{device}/telemetry?limit=1000");
            if !query.is_empty() {
                path.push('&');
                path.push_str(query);
            }
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(&encode(c));
            }
            let page = self.get(&path).await.expect(200);
            items.extend(
                page["items"]
                    .as_array()
                    .expect("items array")
                    .iter()
                    .cloned(),
            );
            match &page["next_cursor"] {
                Value::Null => return items,
                Value::String(c) => cursor = Some(c.clone()),
                other => panic!("next_cursor is neither null nor a string: {other}"),
            }
        }
        panic!("telemetry paging of {device} did not end");
    }

    /// Telemetry items of a device counted by message `id`.
    pub async fn telemetry_counts(&self, device: &str) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for item in self.telemetry_all(device, "order=asc").await {
            let id = item["id"].as_str().expect("item id").to_string();
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, method: Method, url: &str, body: Option<Vec<u8>>) -> Resp {
        let mut req = self.client.request(method.clone(), url);
        if let Some(key) = &self.key {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: reading body: {e}"));
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            raw,
            body,
        }
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
