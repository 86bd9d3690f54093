//! What the two sides of the gateway hand each other: a message's header fields ([`Head`])
//! and its body ([`Body`]), all of it at hand or as it arrives. The engines make them from the
//! wire, the pipeline applies its rules to them, and the upstream layer sends and receives
//! them; none of those imports another's types for it. How a body is delimited on HTTP/1 is
//! [`crate::http1::Framing`].

use std::io;

use bytes::Bytes;
use futures_util::Stream;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::combinators::BoxBody;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http1::Fields;

/// A message body: all of it, read before it goes on (possibly empty), or its chunks as they
/// come.
pub(crate) enum Body<S> {
    Whole(Bytes),
    Stream(S),
}

/// A request body's chunks as they arrive, in the form hyper's client sends.
pub(crate) type Chunks = BoxBody<Bytes, io::Error>;

/// A request's body, from the engine that read it to the upstream that gets it.
pub(crate) type RequestBody = Body<Chunks>;

impl RequestBody {
    /// A body of `chunks` as they come.
    pub(crate) fn streaming<S>(chunks: S) -> RequestBody
    where
        S: Stream<Item = io::Result<Bytes>> + Send + Sync + 'static,
    {
        let frames =
            futures_util::StreamExt::map(chunks, |chunk| chunk.map(hyper::body::Frame::data));
        Body::Stream(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(frames),
        ))
    }

    /// The body as hyper's client takes it.
    pub(crate) fn into_chunks(self) -> Chunks {
        match self {
            Body::Whole(body) => http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                http_body_util::Full::new(body),
                |never| match never {},
            )),
            Body::Stream(chunks) => chunks,
        }
    }
}

/// A message's header fields: a map, or the head as it arrived on a raw connection (read,
/// filtered and written in place by the fast engine, with no map built in between).
pub(crate) enum Head {
    Map(HeaderMap),
    Arrived(Fields),
}

impl Head {
    /// The first value of `name`.
    pub(crate) fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            Head::Map(map) => map.get(name).map(HeaderValue::as_bytes),
            Head::Arrived(fields) => fields.get(name),
        }
    }

    /// The first value of `name`, sharing the head's storage.
    pub(crate) fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        match self {
            Head::Map(map) => map.get(name).cloned(),
            Head::Arrived(fields) => fields.value(name),
        }
    }

    /// Every field, name and value.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let (map, wire) = match self {
            Head::Map(map) => (Some(map), None),
            Head::Arrived(fields) => (None, Some(fields)),
        };
        let map = map.into_iter().flat_map(|map| {
            map.iter()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        });
        map.chain(wire.into_iter().flat_map(Fields::iter))
    }

    /// Keeps the fields whose name `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        match self {
            Head::Map(map) => {
                let going: Vec<HeaderName> = map
                    .keys()
                    .filter(|name| !keep(name.as_str().as_bytes()))
                    .cloned()
                    .collect();
                for name in going {
                    map.remove(name);
                }
            }
            Head::Arrived(fields) => fields.retain(keep),
        }
    }

    /// Adds a field after the others.
    pub(crate) fn append(&mut self, name: HeaderName, value: HeaderValue) {
        match self {
            Head::Map(map) => {
                map.append(name, value);
            }
            Head::Arrived(fields) => fields.append(name, value),
        }
    }

    /// The fields as a header map, for an engine that needs one.
    pub(crate) fn into_map(self) -> HeaderMap {
        match self {
            Head::Map(map) => map,
            Head::Arrived(fields) => fields.to_header_map(),
        }
    }
}

/// A connection's bytes both ways, whatever carries them: a client's connection once its
/// engine has switched protocols, or an upstream's (TCP, through a proxy, in TLS).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
