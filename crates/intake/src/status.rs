//! The public view of an incident (`incidents.status.<id>`, `incidents.query.get`): status,
//! grid, category, handler and deadlines — never actor ids or contact details. Defined in
//! `codecs::status`, shared with dispatch, which announces the commits it writes.

pub use codecs::status::view;
