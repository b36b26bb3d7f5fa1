//! Messages of protocol v1: control messages and the heads of request streams.

use http::header::{HeaderMap, HeaderValue};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::Secret;

/// A message on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// Connector → edge, first message: who this connection serves.
    Register(Register),
    /// Edge → connector: registration accepted.
    Registered(Registered),
    /// Edge → connector: registration refused; the edge closes the connection after it.
    Rejected(Rejected),
    /// Connector → edge: shutting down, route no new requests to this connection.
    Drain,
    /// Edge → connector, answering `Drain`: no request will be routed to this connection any
    /// more and none is in flight on it (every response was relayed whole), so the connector
    /// may close it without losing anything. An edge that predates it never sends it; the
    /// connector then closes when its grace period ends.
    DrainAck,
    /// Connector → edge: a reload changed the connector's ingress rules or plugins; this is
    /// their new digest (as in `Register`).
    Digest(Digest),
    /// A message kind this build does not know; ignored so that v1 can grow.
    #[serde(other)]
    Unknown,
}

/// Registration request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// Protocol version spoken by the connector.
    pub version: u32,
    /// Tunnel id.
    pub tunnel: String,
    /// Tunnel token (never logged: [`Secret`] redacts itself).
    pub token: Secret,
    /// Identifies the connector process, for logs.
    pub connector_id: String,
    /// Index of this connection among the connector's connections to this edge.
    pub conn_index: u32,
    /// The connector's software and version (`sluice/0.1.0`), for the edge's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<String>,
    /// Digest of the connector's ingress rules and plugin chains (`sha256:…`): replicas of one
    /// tunnel that disagree are reported by the edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Encodings of request-stream heads the connector reads besides JSON (see
    /// [`super::HeadCodec`]); absent from connectors that predate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<String>,
    /// A connectivity check (`sluice check --connectivity`): the edge authenticates it and
    /// answers as for a registration, but routes nothing to the connection. An edge that
    /// predates it registers the connection as any other, until the check closes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe: bool,
    /// The connector serves session streams (TCP and UDP services, [`super::SessionHead`]).
    /// An edge sends none to a connector that does not say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sessions: bool,
    /// The connector reads framed bodies with trailers ([`super::body`]). An edge frames
    /// the bodies of no stream of a connector that does not say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trailers: bool,
}

impl Register {
    /// Checks the version, once per connection.
    pub fn check_version(&self) -> Result<(), Rejected> {
        if self.version == super::VERSION {
            Ok(())
        } else {
            Err(Rejected {
                code: RejectCode::UnsupportedVersion,
                message: format!(
                    "protocol version {} is not supported (this edge speaks {})",
                    self.version,
                    super::VERSION
                ),
                retry_after_ms: None,
            })
        }
    }
}

/// The digest of a connector's ingress rules and plugin chains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    /// `sha256:` and 16 hexadecimal digits.
    pub digest: String,
}

/// Registration accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The edge's id for this connection.
    pub connection_id: u64,
    /// Which edge accepted it.
    pub edge_id: String,
    /// The head encoding the connection uses, chosen from `Register.heads`; absent: JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<String>,
    /// The edge acknowledges `Register.trailers`: it may send framed bodies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trailers: bool,
}

/// Registration refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// Human-readable reason, logged by the connector.
    pub message: String,
    /// When the connector may try again, if the edge has an opinion.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectCode {
    /// Unknown tunnel or wrong token (deliberately not distinguished).
    Unauthorized,
    /// The connector speaks another protocol version.
    UnsupportedVersion,
    /// The first message was not a valid `Register`.
    BadRequest,
    /// The edge is shutting down or overloaded.
    Unavailable,
    /// A code from a newer edge.
    #[serde(other)]
    Other,
}

/// First frame of a request stream (edge → connector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// The edge's request id (also sent to the origin as `sluice-request-id`).
    pub request_id: String,
    /// HTTP method.
    pub method: String,
    /// `http` or `https`, as the client spoke to the edge.
    pub scheme: String,
    /// Host the client asked for (port included if it gave one).
    pub authority: String,
    /// Path and query as the client sent them.
    pub path: String,
    /// End-to-end request headers, lowercase names, repeated headers kept.
    pub headers: Headers,
    /// Address of the client, as the edge saw it.
    #[serde(default)]
    pub client_addr: Option<String>,
    /// Protocol the client asked to upgrade to (`websocket`), if any.
    #[serde(default)]
    pub upgrade: Option<String>,
    /// The request has no body at all (as opposed to a body of unknown length).
    #[serde(default)]
    pub empty_body: bool,
    /// Both bodies of the stream are framed and may end with trailers (see
    /// [`crate::proto::body`]); set only on connections whose connector reads them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trailers: bool,
}

/// First frame of the answer on a request stream (connector → edge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: u16,
    /// End-to-end response headers.
    pub headers: Headers,
    /// Who produced the answer.
    pub source: ResponseSource,
}

/// Who produced a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResponseSource {
    /// The origin answered.
    Origin,
    /// A plugin answered locally.
    Plugin,
    /// The connector answered with an error of its own.
    Connector,
    /// A source from a newer connector.
    #[serde(other)]
    Other,
}

/// The headers of a head, kept as the map both ends work with: lowercase names, repeated
/// names in the order they came.
///
/// A head's headers go from a map to the wire and back into a map with nothing in between
/// (they used to pass through a list of owned strings each way, about four allocations per
/// header per hop). A decoded field whose name or value is not valid HTTP is dropped and
/// counted in `invalid`, for the receiver to log.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    /// The headers.
    pub map: HeaderMap,
    /// Fields dropped while decoding because their name or value is not valid HTTP.
    pub invalid: usize,
}

/// Equal when the maps are: `invalid` is what one decoding dropped, not part of the headers
/// (a decoded head re-encoded and decoded again is equal to itself).
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Headers {
    /// Adds one field from the wire, or counts it as invalid.
    pub fn push_wire(&mut self, name: &[u8], value: HeaderValue) {
        match crate::headers::name_from_wire(name) {
            Ok(name) => {
                self.map.append(name, value);
            }
            Err(_) => self.invalid += 1,
        }
    }

    /// Adds one field from the wire whose value still has to be checked.
    pub fn push_wire_bytes(&mut self, name: &[u8], value: &[u8]) {
        match HeaderValue::from_bytes(value) {
            Ok(value) => self.push_wire(name, value),
            Err(_) => self.invalid += 1,
        }
    }
}

impl From<HeaderMap> for Headers {
    fn from(map: HeaderMap) -> Self {
        Headers { map, invalid: 0 }
    }
}

/// `(name, value)` pairs, as tests and the JSON form write them.
impl From<Vec<(String, HeaderValueBytes)>> for Headers {
    fn from(pairs: Vec<(String, HeaderValueBytes)>) -> Self {
        let mut headers = Headers::default();
        for (name, value) in &pairs {
            headers.push_wire_bytes(name.as_bytes(), &value.0);
        }
        headers
    }
}

/// The JSON form: a list of `[name, value]` pairs, each value as [`HeaderValueBytes`] writes
/// it.
impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.map
                .iter()
                .map(|(name, value)| (name.as_str(), ValueRef(value.as_bytes()))),
        )
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<(String, HeaderValueBytes)>::deserialize(d).map(Headers::from)
    }
}

/// A borrowed header value, serialised as [`HeaderValueBytes`] is.
struct ValueRef<'a>(&'a [u8]);

impl Serialize for ValueRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_seq(self.0.iter()),
        }
    }
}

/// A header value: encoded as a JSON string when it is UTF-8 (nearly always), else as an
/// array of bytes, so no value is ever lost or altered in transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValueBytes(pub Vec<u8>);

impl From<&[u8]> for HeaderValueBytes {
    fn from(b: &[u8]) -> Self {
        HeaderValueBytes(b.to_vec())
    }
}

impl From<&str> for HeaderValueBytes {
    fn from(s: &str) -> Self {
        HeaderValueBytes(s.as_bytes().to_vec())
    }
}

impl Serialize for HeaderValueBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ValueRef(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for HeaderValueBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = HeaderValueBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a header value as a string or an array of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HeaderValueBytes(v.as_bytes().to_vec()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(HeaderValueBytes(v.to_vec()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(HeaderValueBytes(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode, encode};

    #[test]
    fn request_head_round_trip_keeps_binary_and_repeated_headers() {
        let head = RequestHead {
            request_id: "r1".into(),
            method: "POST".into(),
            scheme: "https".into(),
            authority: "app.example.com".into(),
            path: "/a/b?c=d".into(),
            headers: vec![
                ("cookie".into(), "a=1".into()),
                ("cookie".into(), "b=2".into()),
                ("x-bin".into(), HeaderValueBytes(vec![0xff, 0x80, b'a'])),
            ]
            .into(),
            client_addr: Some("192.0.2.1:5555".into()),
            upgrade: None,
            empty_body: false,
            trailers: false,
        };
        let frame = encode(&head).unwrap();
        let back: RequestHead = decode(&frame[4..]).unwrap();
        assert_eq!(back, head);
    }

    #[test]
    fn response_head_round_trip() {
        let head = ResponseHead {
            status: 101,
            headers: vec![("upgrade".into(), "websocket".into())].into(),
            source: ResponseSource::Origin,
        };
        let back: ResponseHead = decode(&encode(&head).unwrap()[4..]).unwrap();
        assert_eq!(back, head);
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut reg = Register {
            version: 1,
            tunnel: "t".into(),
            token: Secret::new("x"),
            connector_id: "c".into(),
            conn_index: 0,
            software: None,
            digest: None,
            heads: Vec::new(),
            probe: false,
            sessions: false,
            trailers: false,
        };
        assert!(reg.check_version().is_ok());
        reg.version = 2;
        let rej = reg.check_version().unwrap_err();
        assert_eq!(rej.code, RejectCode::UnsupportedVersion);
        assert!(rej.message.contains("version 2"));
    }

    #[test]
    fn register_from_an_older_connector_decodes_and_digest_round_trips() {
        let old = br#"{"type":"register","version":1,"tunnel":"t","token":"x","connector_id":"c","conn_index":0}"#;
        let Control::Register(reg) = decode::<Control>(old).unwrap() else {
            panic!("not a register");
        };
        assert_eq!((reg.software, reg.digest), (None, None));
        assert!(
            reg.heads.is_empty(),
            "an older connector reads JSON heads only"
        );
        let msg = Control::Digest(Digest {
            digest: "sha256:0123456789abcdef".into(),
        });
        let back: Control = decode(&encode(&msg).unwrap()[4..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn unknown_codes_and_sources_decode() {
        let r: Rejected = decode(br#"{"code":"quota-exceeded","message":"m"}"#).unwrap();
        assert_eq!(r.code, RejectCode::Other);
        let h: ResponseHead = decode(br#"{"status":200,"headers":[],"source":"cache"}"#).unwrap();
        assert_eq!(h.source, ResponseSource::Other);
    }

    #[test]
    fn register_debug_hides_token() {
        let reg = Register {
            version: 1,
            tunnel: "t".into(),
            token: Secret::new("supersecret"),
            connector_id: "c".into(),
            conn_index: 0,
            software: None,
            digest: None,
            heads: Vec::new(),
            probe: false,
            sessions: false,
            trailers: false,
        };
        assert!(!format!("{reg:?}").contains("supersecret"));
    }
}
