//! The incident category taxonomy (`config/categories.toml`).
//!
//! Two levels, as in the urban-management standard GB/T 30428.2 / CJ/T 315 (部件和事件分类):
//! a class (大类, 2 digits) and its subclasses (小类, 4 digits). Each category says whether it is
//! an emergency (wall-clock deadlines, emergency whistle at once) and its default handling
//! level. The file is embedded as the default; a service may parse an override it read itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::CategoryCode;

/// The default taxonomy file, embedded at build time.
pub const DEFAULT_CATEGORIES_TOML: &str = include_str!("../../../config/categories.toml");

/// Most categories a taxonomy may hold (a bound on config input).
pub const CATEGORIES_MAX: usize = 2_000;

/// Who normally handles a category, lowest first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlingLevel {
    /// The grid worker (网格员) fixes it on the spot.
    GridWorker,
    /// The community (社区) workstation.
    Community,
    /// The street (街道) office.
    Street,
    /// A functional department of the district/county.
    Department,
}

/// One category.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Category {
    pub code: CategoryCode,
    pub name_zh: String,
    pub name_en: String,
    pub emergency: bool,
    pub default_level: HandlingLevel,
}

/// A validated taxonomy.
#[derive(Clone, Debug)]
pub struct Taxonomy {
    categories: BTreeMap<CategoryCode, Category>,
}

/// Why a taxonomy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TaxonomyError {
    #[error("categories file is not valid TOML for the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("category code {code:?} is invalid: {source}")]
    BadCode {
        code: String,
        source: crate::ids::CodeError,
    },
    #[error("category {0} is defined twice")]
    Duplicate(CategoryCode),
    #[error("category {code}: parent class {parent} is not defined")]
    MissingParent {
        code: CategoryCode,
        parent: CategoryCode,
    },
    #[error("category {0}: the Chinese and English names must both be non-empty")]
    EmptyName(CategoryCode),
    #[error("the taxonomy holds {count} categories, more than CATEGORIES_MAX = {CATEGORIES_MAX}")]
    TooMany { count: usize },
    #[error("the taxonomy defines no category")]
    Empty,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCategory {
    code: String,
    zh: String,
    en: String,
    #[serde(default)]
    emergency: bool,
    level: HandlingLevel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "category")]
    categories: Vec<FileCategory>,
}

impl Taxonomy {
    /// The embedded default taxonomy. Panics only if the committed file is broken, which the
    /// crate's tests rule out.
    pub fn default_embedded() -> Taxonomy {
        match Taxonomy::parse(DEFAULT_CATEGORIES_TOML) {
            Ok(t) => t,
            Err(e) => panic!("embedded config/categories.toml is invalid: {e}"),
        }
    }

    /// Parses and validates a taxonomy file's text.
    pub fn parse(text: &str) -> Result<Taxonomy, TaxonomyError> {
        let file: File = toml::from_str(text)?;
        if file.categories.is_empty() {
            return Err(TaxonomyError::Empty);
        }
        if file.categories.len() > CATEGORIES_MAX {
            return Err(TaxonomyError::TooMany {
                count: file.categories.len(),
            });
        }
        let mut categories = BTreeMap::new();
        for c in file.categories {
            let code: CategoryCode = c.code.parse().map_err(|source| TaxonomyError::BadCode {
                code: c.code.clone(),
                source,
            })?;
            if c.zh.trim().is_empty() || c.en.trim().is_empty() {
                return Err(TaxonomyError::EmptyName(code));
            }
            let category = Category {
                code,
                name_zh: c.zh,
                name_en: c.en,
                emergency: c.emergency,
                default_level: c.level,
            };
            if categories.insert(code, category).is_some() {
                return Err(TaxonomyError::Duplicate(code));
            }
        }
        for code in categories.keys() {
            if let Some(parent) = code.parent()
                && !categories.contains_key(&parent)
            {
                return Err(TaxonomyError::MissingParent {
                    code: *code,
                    parent,
                });
            }
        }
        Ok(Taxonomy { categories })
    }

    pub fn get(&self, code: CategoryCode) -> Option<&Category> {
        self.categories.get(&code)
    }

    /// All categories in code order.
    pub fn iter(&self) -> impl Iterator<Item = &Category> {
        self.categories.values()
    }

    /// Categories an incident may be filed under: subclasses, and classes without subclasses.
    pub fn leaves(&self) -> impl Iterator<Item = &Category> {
        self.categories.values().filter(|c| {
            c.code.parent().is_some() || !self.categories.keys().any(|k| k.parent() == Some(c.code))
        })
    }

    pub fn is_leaf(&self, code: CategoryCode) -> bool {
        self.categories.contains_key(&code)
            && (code.parent().is_some()
                || !self.categories.keys().any(|k| k.parent() == Some(code)))
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(text: &str, expect: Expect) {
        let actual = match Taxonomy::parse(text) {
            Ok(t) => format!(
                "ok: {} categories, {} leaves",
                t.iter().count(),
                t.leaves().count()
            ),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&actual);
    }

    const ONE: &str = "[[category]]\ncode = \"01\"\nzh = \"市容环境\"\nen = \"City appearance\"\nlevel = \"grid_worker\"\n";

    #[test]
    fn embedded_taxonomy_is_valid() {
        let t = Taxonomy::default_embedded();
        assert!(t.leaves().count() > 40, "expected a real taxonomy");
    }

    #[test]
    fn validation() {
        check(ONE, expect!["ok: 1 categories, 1 leaves"]);
        check(
            &format!("{ONE}{ONE}"),
            expect!["error: category 01 is defined twice"],
        );
        check(
            "[[category]]\ncode = \"0201\"\nzh = \"x\"\nen = \"x\"\nlevel = \"street\"\n",
            expect!["error: category 0201: parent class 02 is not defined"],
        );
        check(
            "[[category]]\ncode = \"1\"\nzh = \"x\"\nen = \"x\"\nlevel = \"street\"\n",
            expect![[
                r#"error: category code "1" is invalid: category code "1" must be 2 digits (class) or 4 digits (class + subclass), not 00"#
            ]],
        );
        check(
            "[[category]]\ncode = \"01\"\nzh = \"\"\nen = \"x\"\nlevel = \"street\"\n",
            expect!["error: category 01: the Chinese and English names must both be non-empty"],
        );
        check(
            "category = []\n",
            expect!["error: the taxonomy defines no category"],
        );
    }
}
