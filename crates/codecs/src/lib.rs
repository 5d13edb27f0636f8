//! Binds the pure domain's frozen event encodings to the event store.
//!
//! `domain` knows how its events become bytes (versioned, upcast, golden-tested) but must not
//! depend on the event store (tokio, NATS); the event store is generic over any codec. This
//! crate is the one place where the two meet, so intake, dispatch and projections all read
//! and write the INCIDENTS stream through the same codec.
#![forbid(unsafe_code)]

pub mod status;

use eventstore::{CodecError, EncodedEvent, EventCodec};

/// Incident events (INCIDENTS stream), through `domain::encoding`.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncidentCodec;

impl EventCodec for IncidentCodec {
    type Event = domain::IncidentEvent;

    fn encode(&self, event: &domain::IncidentEvent) -> Result<EncodedEvent, CodecError> {
        let encoded = domain::encoding::encode_event(event);
        Ok(EncodedEvent {
            event_type: encoded.event_type.to_owned(),
            schema_version: encoded.schema_version,
            payload: encoded.payload,
        })
    }

    fn decode(
        &self,
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<domain::IncidentEvent, CodecError> {
        domain::encoding::decode_event(event_type, schema_version, payload).map_err(|error| {
            CodecError::Decode {
                event_type: event_type.to_owned(),
                schema_version,
                reason: error.to_string(),
            }
        })
    }
}
