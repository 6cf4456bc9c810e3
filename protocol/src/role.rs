use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Roles are hierarchical: every role may do all that the roles below it may.
/// The derived `Ord` encodes that hierarchy (Ingest < Extract < Admin).
/// Read through `FromStr`, so a wrong one says which roles there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Role {
    /// Publishes its own records; reads nothing but its own command topics.
    Ingest,
    /// Ingest, plus following validated records on `live/#` and the query API.
    Extract,
    /// Everything, including device and stream administration.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Extract => "extract",
            Role::Admin => "admin",
        }
    }

    /// True when this role includes everything `needed` may do.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingest" => Ok(Role::Ingest),
            "extract" => Ok(Role::Extract),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected ingest, extract or admin"
            )),
        }
    }
}

impl TryFrom<String> for Role {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchy_admin_includes_extract_includes_ingest() {
        assert!(Role::Admin.allows(Role::Extract));
        assert!(Role::Extract.allows(Role::Ingest));
        assert!(!Role::Ingest.allows(Role::Extract));
        assert!(!Role::Extract.allows(Role::Admin));
    }

    #[test]
    fn parses_and_prints_the_cli_spelling() {
        for role in [Role::Ingest, Role::Extract, Role::Admin] {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn json_names_the_roles_there_are() {
        assert_eq!(
            serde_json::from_str::<Role>(r#""extract""#).unwrap(),
            Role::Extract
        );
        assert_eq!(serde_json::to_string(&Role::Admin).unwrap(), r#""admin""#);
        let error = serde_json::from_str::<Role>(r#""root""#).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(r#"unknown role "root": expected ingest, extract or admin"#),
            "{error}"
        );
    }
}
