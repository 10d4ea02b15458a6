//! Fuzzes the upgrade head parser (`handshake::parse_head`) and the credentials it
//! reads: any bytes are refused with a well-formed HTTP answer, wait for more, or give
//! an upgrade whose token is plausible and whose `101` answer echoes nothing of the
//! request but the subprotocol; never a panic.

#![no_main]

use gateway_fuzz::handshake::{self, SUBPROTOCOL};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match handshake::parse_head(data) {
        Ok(None) => {}
        Ok(Some((request, rest))) => {
            assert!(data.ends_with(&rest));
            assert!(!request.key.is_empty());
            if let Some(token) = &request.token {
                assert!(!token.is_empty() && token.len() <= 512);
                assert!(token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            }
            let response = handshake::accept_response(&request);
            assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(response.ends_with("\r\n\r\n"));
            let lines = if request.offers_subprotocol { 6 } else { 5 };
            assert_eq!(response.matches("\r\n").count(), lines, "{response:?}");
            assert!(!response.contains("bearer"));
            assert_eq!(response.contains(SUBPROTOCOL), request.offers_subprotocol);
        }
        Err(refusal) => {
            assert!(matches!(refusal.status, 400 | 401 | 404), "{refusal:?}");
            let response = refusal.response();
            assert!(response.starts_with(&format!("HTTP/1.1 {} ", refusal.status)));
            let (_, body) = response.split_once("\r\n\r\n").expect("a head and a body");
            let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
            assert_eq!(body["error"], refusal.error);
        }
    }
});
