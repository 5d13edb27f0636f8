use std::marker::PhantomData;

/// One event as stored: its type name, the version of the frozen encoding, and the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    pub event_type: String,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode {event_type}: {reason}")]
    Encode { event_type: String, reason: String },
    #[error("decode {event_type} v{schema_version}: {reason}")]
    Decode {
        event_type: String,
        schema_version: u16,
        reason: String,
    },
    #[error("unknown event type {event_type} v{schema_version}")]
    UnknownType {
        event_type: String,
        schema_version: u16,
    },
}

/// Turns domain events into stored bytes and back. Implementations keep every old
/// `(event_type, schema_version)` decodable forever, upcasting to today's types.
pub trait EventCodec: Clone + Send + Sync + 'static {
    type Event: Clone + Send + Sync + std::fmt::Debug + 'static;

    fn encode(&self, event: &Self::Event) -> Result<EncodedEvent, CodecError>;

    fn decode(
        &self,
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<Self::Event, CodecError>;
}

/// First allocation for an encoded event, in bytes.
const EVENT_BYTES_GUESS: usize = 256;

/// A codec for event types whose postcard form is frozen as version 1 under one type name.
/// Meant for tests and benchmarks; domain contexts write their own versioned codecs.
#[derive(Debug)]
pub struct PostcardCodec<E> {
    event_type: &'static str,
    _event: PhantomData<fn() -> E>,
}

impl<E> Clone for PostcardCodec<E> {
    fn clone(&self) -> Self {
        PostcardCodec {
            event_type: self.event_type,
            _event: PhantomData,
        }
    }
}

impl<E> PostcardCodec<E> {
    pub const SCHEMA_VERSION: u16 = 1;

    pub fn new(event_type: &'static str) -> Self {
        PostcardCodec {
            event_type,
            _event: PhantomData,
        }
    }
}

impl<E> EventCodec for PostcardCodec<E>
where
    E: serde::Serialize
        + serde::de::DeserializeOwned
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    type Event = E;

    fn encode(&self, event: &E) -> Result<EncodedEvent, CodecError> {
        // Most events fit in the first allocation (to_allocvec would start empty and grow).
        let payload =
            postcard::to_extend(event, Vec::with_capacity(EVENT_BYTES_GUESS)).map_err(|error| {
                CodecError::Encode {
                    event_type: self.event_type.to_owned(),
                    reason: error.to_string(),
                }
            })?;
        Ok(EncodedEvent {
            event_type: self.event_type.to_owned(),
            schema_version: Self::SCHEMA_VERSION,
            payload,
        })
    }

    fn decode(
        &self,
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<E, CodecError> {
        if event_type != self.event_type || schema_version != Self::SCHEMA_VERSION {
            return Err(CodecError::UnknownType {
                event_type: event_type.to_owned(),
                schema_version,
            });
        }
        postcard::from_bytes(payload).map_err(|error| CodecError::Decode {
            event_type: event_type.to_owned(),
            schema_version,
            reason: error.to_string(),
        })
    }
}
