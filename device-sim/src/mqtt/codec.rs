//! The few MQTT 3.1.1 packets `bench-mqtt` exchanges, encoded and decoded from byte slices
//! (no I/O): CONNECT, CONNACK, PUBLISH (QoS 0 or 1), PUBACK, PINGREQ, PINGRESP, DISCONNECT.
//! Section numbers are those of the OASIS MQTT 3.1.1 specification.

/// The largest remaining length the 4-byte varint can carry (2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// CONNACK return code of an accepted connection (3.2.2.3).
pub const CONNECTION_ACCEPTED: u8 = 0;

/// One control packet; borrowed fields point into the decoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Without will, user name or password (3.1).
    Connect {
        client_id: &'a str,
        keep_alive: u16,
        clean_session: bool,
    },
    /// `code` 0 is acceptance (3.2).
    ConnAck { session_present: bool, code: u8 },
    /// QoS 0 when `pkid` is `None`, QoS 1 otherwise; never a duplicate, never retained (3.3).
    Publish {
        topic: &'a str,
        pkid: Option<u16>,
        payload: &'a [u8],
    },
    /// 3.4.
    PubAck { pkid: u16 },
    /// 3.12.
    PingReq,
    /// 3.13.
    PingResp,
    /// 3.14.
    Disconnect,
}

/// Why bytes are not a packet this codec knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the remaining length takes more than 4 bytes")]
    RemainingLength,
    #[error("packet type {0} is not handled")]
    UnhandledType(u8),
    #[error("packet type {kind} with flags {flags:#06b} is malformed")]
    Malformed { kind: u8, flags: u8 },
    #[error("a string is not UTF-8")]
    NotUtf8,
    #[error("CONNECT for protocol `{0}` level {1}, not MQTT 3.1.1")]
    Protocol(String, u8),
}

impl Packet<'_> {
    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Packet::Connect {
                client_id,
                keep_alive,
                clean_session,
            } => {
                header(out, 0x10, 10 + 2 + client_id.len());
                put_str(out, "MQTT");
                out.push(4);
                out.push(if clean_session { 0x02 } else { 0 });
                out.extend_from_slice(&keep_alive.to_be_bytes());
                put_str(out, client_id);
            }
            Packet::ConnAck {
                session_present,
                code,
            } => out.extend_from_slice(&[0x20, 2, u8::from(session_present), code]),
            Packet::Publish {
                topic,
                pkid,
                payload,
            } => {
                let qos = if pkid.is_some() { 0x02 } else { 0 };
                let id_len = if pkid.is_some() { 2 } else { 0 };
                header(out, 0x30 | qos, 2 + topic.len() + id_len + payload.len());
                put_str(out, topic);
                if let Some(pkid) = pkid {
                    out.extend_from_slice(&pkid.to_be_bytes());
                }
                out.extend_from_slice(payload);
            }
            Packet::PubAck { pkid } => {
                out.extend_from_slice(&[0x40, 2]);
                out.extend_from_slice(&pkid.to_be_bytes());
            }
            Packet::PingReq => out.extend_from_slice(&[0xC0, 0]),
            Packet::PingResp => out.extend_from_slice(&[0xD0, 0]),
            Packet::Disconnect => out.extend_from_slice(&[0xE0, 0]),
        }
    }

    /// The packet's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Decodes the packet at the start of `bytes`: the packet and how many bytes it took, or
/// `None` when `bytes` holds only part of it.
pub fn decode(bytes: &[u8]) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    let Some((length, length_bytes)) = remaining_length(&bytes[1..])? else {
        return Ok(None);
    };
    let start = 1 + length_bytes;
    let Some(body) = bytes.get(start..start + length) else {
        return Ok(None);
    };
    let (kind, flags) = (first >> 4, first & 0x0F);
    let malformed = DecodeError::Malformed { kind, flags };
    let packet = match (kind, flags, body) {
        (1, 0, _) => connect(body).ok_or(malformed)??,
        (2, 0, &[ack_flags, code]) if ack_flags <= 1 => Packet::ConnAck {
            session_present: ack_flags == 1,
            code,
        },
        // QoS 0 or 1, neither duplicate nor retained.
        (3, 0 | 0x02, _) => {
            let mut reader = Reader(body);
            let topic = reader.str().ok_or(malformed.clone())??;
            let pkid = match flags {
                0 => None,
                _ => Some(reader.u16().ok_or(malformed)?),
            };
            Packet::Publish {
                topic,
                pkid,
                payload: reader.0,
            }
        }
        (4, 0, &[high, low]) => Packet::PubAck {
            pkid: u16::from_be_bytes([high, low]),
        },
        (12, 0, []) => Packet::PingReq,
        (13, 0, []) => Packet::PingResp,
        (14, 0, []) => Packet::Disconnect,
        (1..=4 | 12..=14, _, _) => return Err(malformed),
        _ => return Err(DecodeError::UnhandledType(kind)),
    };
    Ok(Some((packet, start + length)))
}

/// The fixed header: type and flags, then the remaining length (2.2).
fn header(out: &mut Vec<u8>, first: u8, remaining: usize) {
    debug_assert!(remaining <= MAX_REMAINING_LENGTH);
    out.reserve(5 + remaining);
    out.push(first);
    let mut rest = remaining;
    loop {
        let mut byte = (rest % 128) as u8;
        rest /= 128;
        if rest > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if rest == 0 {
            break;
        }
    }
}

/// The remaining length at the start of `bytes` and how many bytes it took (2.2.3).
fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if i == 4 {
            return Err(DecodeError::RemainingLength);
        }
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(DecodeError::RemainingLength);
    }
    Ok(None)
}

/// A UTF-8 string: its length in two bytes, then the bytes (1.5.3).
fn put_str(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("MQTT strings are at most 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// CONNECT's variable header and client id; `None` when it is cut short. Will, user name and
/// password, which this client never sends, are refused as malformed.
fn connect(body: &[u8]) -> Option<Result<Packet<'_>, DecodeError>> {
    let mut reader = Reader(body);
    let protocol = match reader.str()? {
        Ok(protocol) => protocol,
        Err(e) => return Some(Err(e)),
    };
    let level = reader.u8()?;
    if protocol != "MQTT" || level != 4 {
        return Some(Err(DecodeError::Protocol(protocol.into(), level)));
    }
    let flags = reader.u8()?;
    let keep_alive = reader.u16()?;
    let client_id = match reader.str()? {
        Ok(id) => id,
        Err(e) => return Some(Err(e)),
    };
    if flags & !0x02 != 0 || !reader.0.is_empty() {
        return None;
    }
    Some(Ok(Packet::Connect {
        client_id,
        keep_alive,
        clean_session: flags & 0x02 != 0,
    }))
}

/// Reads a packet's body front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn str(&mut self) -> Option<Result<&'a str, DecodeError>> {
        let len = self.u16()?;
        let bytes = self.take(usize::from(len))?;
        Some(std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(packet: Packet<'_>, bytes: &[u8]) {
        assert_eq!(packet.to_vec(), bytes, "{packet:?}");
        assert_eq!(decode(bytes), Ok(Some((packet, bytes.len()))));
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn remaining_lengths_are_the_specs_examples() {
        // Table 2.4: the first and last value of each encoded length.
        let table: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (value, bytes) in table {
            let mut out = Vec::new();
            header(&mut out, 0x30, value);
            assert_eq!(&out[1..], bytes, "{value}");
            assert_eq!(
                remaining_length(bytes),
                Ok(Some((value, bytes.len()))),
                "{value}"
            );
            assert_eq!(remaining_length(&bytes[..bytes.len() - 1]), Ok(None));
        }
        assert_eq!(
            remaining_length(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(DecodeError::RemainingLength)
        );
    }

    #[test]
    fn connect_is_mqtt_3_1_1_with_a_clean_session() {
        // 3.1.2: protocol name, level 4, connect flags (clean session), keep alive 60 (3.1.2.10
        // uses 10), then the client id (3.1.3).
        #[rustfmt::skip]
        let bytes = [
            0x10, 17,
            0x00, 0x04, b'M', b'Q', b'T', b'T',
            0x04,
            0x02,
            0x00, 0x3C,
            0x00, 0x05, b's', b'i', b'm', b'-', b'1',
        ];
        roundtrip(
            Packet::Connect {
                client_id: "sim-1",
                keep_alive: 60,
                clean_session: true,
            },
            &bytes,
        );
        let mut level_3 = bytes;
        level_3[8] = 3;
        assert!(matches!(decode(&level_3), Err(DecodeError::Protocol(_, 3))));
        let mut with_password = bytes;
        with_password[9] = 0x42;
        assert!(matches!(
            decode(&with_password),
            Err(DecodeError::Malformed { kind: 1, .. })
        ));
    }

    #[test]
    fn connack_carries_session_present_and_return_code() {
        roundtrip(
            Packet::ConnAck {
                session_present: false,
                code: CONNECTION_ACCEPTED,
            },
            &[0x20, 0x02, 0x00, 0x00],
        );
        // 3.2.2.3: 5 is "not authorized".
        roundtrip(
            Packet::ConnAck {
                session_present: true,
                code: 5,
            },
            &[0x20, 0x02, 0x01, 0x05],
        );
        assert!(decode(&[0x20, 0x02, 0x02, 0x00]).is_err());
        assert!(decode(&[0x20, 0x03, 0x00, 0x00, 0x00]).is_err());
    }

    #[test]
    fn publish_qos1_has_topic_then_packet_id_then_payload() {
        // 3.3.2.3: topic "a/b", packet id 10.
        #[rustfmt::skip]
        let bytes = [
            0x32, 9,
            0x00, 0x03, b'a', b'/', b'b',
            0x00, 0x0A,
            b'{', b'}',
        ];
        roundtrip(
            Packet::Publish {
                topic: "a/b",
                pkid: Some(10),
                payload: b"{}",
            },
            &bytes,
        );
        roundtrip(
            Packet::Publish {
                topic: "a/b",
                pkid: None,
                payload: b"hi",
            },
            &[0x30, 7, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
        );
        // A 200-byte payload takes a two-byte remaining length.
        let payload = [b'x'; 200];
        let packet = Packet::Publish {
            topic: "bench/sim-00001",
            pkid: Some(65_535),
            payload: &payload,
        };
        let bytes = packet.to_vec();
        assert_eq!(&bytes[..3], &[0x32, 219, 1]); // 2 + 15 + 2 + 200 = 219 + 1 * 128
        roundtrip(packet, &bytes);
        // QoS 2, DUP and RETAIN are not this codec's.
        for first in [0x34, 0x3A, 0x33] {
            let mut other = bytes.clone();
            other[0] = first;
            assert!(decode(&other).is_err(), "{first:#x}");
        }
    }

    #[test]
    fn puback_ping_and_disconnect_are_fixed_bytes() {
        roundtrip(Packet::PubAck { pkid: 10 }, &[0x40, 0x02, 0x00, 0x0A]);
        roundtrip(Packet::PubAck { pkid: 0x1234 }, &[0x40, 0x02, 0x12, 0x34]);
        roundtrip(Packet::PingReq, &[0xC0, 0x00]);
        roundtrip(Packet::PingResp, &[0xD0, 0x00]);
        roundtrip(Packet::Disconnect, &[0xE0, 0x00]);
        // Reserved flags must be zero (2.2.2).
        assert!(decode(&[0x42, 0x02, 0x00, 0x0A]).is_err());
        assert!(decode(&[0xE1, 0x00]).is_err());
    }

    #[test]
    fn packets_follow_one_another_in_a_buffer() {
        let mut bytes = Packet::PubAck { pkid: 1 }.to_vec();
        Packet::PubAck { pkid: 2 }.encode(&mut bytes);
        bytes.extend_from_slice(&[0x40, 0x02, 0x00]);
        let (first, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!((first, used), (Packet::PubAck { pkid: 1 }, 4));
        let (second, used2) = decode(&bytes[used..]).unwrap().unwrap();
        assert_eq!(second, Packet::PubAck { pkid: 2 });
        assert_eq!(decode(&bytes[used + used2..]), Ok(None));
    }

    #[test]
    fn other_packet_types_are_refused() {
        // SUBSCRIBE (8), as a broker would never send it to a client.
        assert_eq!(
            decode(&[0x82, 0x02, 0x00, 0x01]),
            Err(DecodeError::UnhandledType(8))
        );
    }
}
