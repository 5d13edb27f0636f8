use std::fmt;

/// Longest aggregate id, in bytes.
pub const AGGREGATE_ID_BYTES_MAX: usize = 200;

/// The id of an aggregate; it becomes the tail of the aggregate's NATS subject, so it may
/// hold dot-separated tokens (`sanming.0193...`) of `[A-Za-z0-9_-]`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateIdError {
    #[error("aggregate id is empty")]
    Empty,
    #[error("aggregate id is {length} bytes, more than {AGGREGATE_ID_BYTES_MAX}")]
    TooLong { length: usize },
    #[error("aggregate id {id:?} has an empty token (leading, trailing or double dot)")]
    EmptyToken { id: String },
    #[error("aggregate id {id:?} has {character:?}; only A-Z a-z 0-9 _ - and . are allowed")]
    BadCharacter { id: String, character: char },
}

impl AggregateId {
    pub fn new(id: impl Into<String>) -> Result<AggregateId, AggregateIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(AggregateIdError::Empty);
        }
        if id.len() > AGGREGATE_ID_BYTES_MAX {
            return Err(AggregateIdError::TooLong { length: id.len() });
        }
        if let Some(character) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(AggregateIdError::BadCharacter { id, character });
        }
        if id.split('.').any(str::is_empty) {
            return Err(AggregateIdError::EmptyToken { id });
        }
        Ok(AggregateId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(input: &str, expect: Expect) {
        let actual = match AggregateId::new(input) {
            Ok(id) => format!("ok {id}"),
            Err(error) => format!("error: {error}"),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn aggregate_ids() {
        check("sanming.0193a1b2", expect!["ok sanming.0193a1b2"]);
        check(
            "community-350402001001",
            expect!["ok community-350402001001"],
        );
        check("", expect!["error: aggregate id is empty"]);
        check(
            "a..b",
            expect![[
                r#"error: aggregate id "a..b" has an empty token (leading, trailing or double dot)"#
            ]],
        );
        check(
            "a.*",
            expect![[
                r#"error: aggregate id "a.*" has '*'; only A-Z a-z 0-9 _ - and . are allowed"#
            ]],
        );
        check(
            "a b",
            expect![[
                r#"error: aggregate id "a b" has ' '; only A-Z a-z 0-9 _ - and . are allowed"#
            ]],
        );
        check(
            &"x".repeat(201),
            expect!["error: aggregate id is 201 bytes, more than 200"],
        );
    }
}
