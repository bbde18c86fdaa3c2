//! Connection URLs with their secrets hidden, for logs and `herald check-config`.
//!
//! A Redis or PostgreSQL URL may carry a password in its user info (`redis://:pw@host`) or, for
//! libpq, in its query (`postgres://host/db?password=pw`); both are hidden. The URL is parsed
//! rather than split at an `@`, since an unescaped `@` in a password would otherwise leave
//! the rest of it in the output.

/// What replaces a hidden value.
const HIDDEN: &str = "***";

/// `url` with any password (in the user info, or a query parameter whose name says password,
/// secret or token) replaced by `***`. A value that is not a URL is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<not a URL>".to_owned();
    };
    if parsed.password().is_some() {
        // Only URLs that can carry a password have one, so this cannot fail.
        let _ = parsed.set_password(Some(HIDDEN));
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["password", "secret", "token"]
            .iter()
            .any(|s| name.contains(s))
    };
    if parsed.query_pairs().any(|(name, _)| secret(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    HIDDEN.to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden_wherever_the_url_carries_them() {
        assert_eq!(
            redact_url("redis://:s3cret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss@db:5432/herald"),
            "postgres://app:***@db:5432/herald",
            "an unescaped @ in the password"
        );
        assert_eq!(
            redact_url("postgres://db/herald?user=app&password=pw&sslmode=require"),
            "postgres://db/herald?user=app&password=***&sslmode=require"
        );
        let shown = redact_url("rediss://default:tok@host:6380?auth_token=tok");
        assert!(
            !shown.contains("tok@") && !shown.contains("=tok"),
            "{shown}"
        );
    }

    #[test]
    fn urls_without_secrets_are_shown_as_they_are() {
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(
            redact_url("sqlite:data/herald.db?mode=rwc"),
            "sqlite:data/herald.db?mode=rwc"
        );
        assert_eq!(redact_url("not a url"), "<not a URL>");
    }
}
