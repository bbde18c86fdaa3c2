//! Authentication: verifies the JWT a client presents at the handshake, and mints development
//! tokens for `herald token`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{RoomName, RoomPatterns, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthMode, Config, Secret};

/// Why a token was refused, or why the keys could not be loaded. Clients only ever see
/// `unauthorized`; the detail goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token signed with {0:?}, which this server has no key for")]
    NoKeyFor(Algorithm),
    #[error(
        "token sub {0:?} is not a valid user id (1 to 123 bytes of letters, digits and _ - : . @ / = + |)"
    )]
    BadSubject(String),
    #[error("jwt public key: {0}")]
    PublicKey(String),
    #[error("development secret {path}: {reason}")]
    DevSecret { path: String, reason: String },
}

/// The claims herald reads. `rooms`, when present, limits the rooms the user may join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Who a connection belongs to, and what it may join.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub rooms: RoomPatterns,
}

impl Identity {
    /// Whether this identity may join `room`: its own personal room, or any other room its
    /// token's patterns allow; never another user's personal room.
    pub fn may_join(&self, room: &RoomName) -> bool {
        match room.owner() {
            Some(owner) => owner == self.user.as_str(),
            None => self.rooms.allows(room),
        }
    }
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    mode: AuthMode,
    hmac: Option<DecodingKey>,
    public: Option<(DecodingKey, Algorithm)>,
}

impl Verifier {
    /// Loads the keys `config` names: the HS256 secret (or the generated development secret)
    /// and the RS256/ES256 public key.
    pub fn from_config(config: &Config) -> Result<Self, AuthError> {
        let public = config
            .jwt_public_key
            .as_deref()
            .map(load_public_key)
            .transpose()?;
        let secret = match (&config.jwt_secret, &public) {
            (Some(secret), _) => Some(secret.clone()),
            (None, None) => Some(dev_secret(&config.data_dir)?),
            (None, Some(_)) => None,
        };
        Ok(Self {
            mode: config.auth,
            hmac: secret.map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            public,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Checks `token`. In dev mode (`HERALD_AUTH=off`) a missing or bad token yields an
    /// anonymous user instead of an error.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let result = token
            .ok_or(AuthError::Missing)
            .and_then(|t| self.verify_token(t));
        match (result, self.mode) {
            (Ok(identity), _) => Ok(identity),
            (Err(_), AuthMode::Off) => Ok(Identity {
                user: UserId::new(format!("anon-{}", crate::random_id(8))),
                rooms: RoomPatterns::any(),
            }),
            (Err(e), AuthMode::On) => Err(e),
        }
    }

    fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let alg = jsonwebtoken::decode_header(token)?.alg;
        let key = match alg {
            Algorithm::HS256 => self.hmac.as_ref(),
            _ => self
                .public
                .as_ref()
                .filter(|(_, a)| *a == alg)
                .map(|(k, _)| k),
        }
        .ok_or(AuthError::NoKeyFor(alg))?;
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_aud = false;
        // A token issued for later (`nbf` in the future) is not valid yet.
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims;
        check_subject(&claims.sub)?;
        let user = UserId::new(claims.sub.as_str());
        let rooms = claims
            .rooms
            .as_deref()
            .map_or_else(RoomPatterns::any, RoomPatterns::only);
        Ok(Identity { user, rooms })
    }
}

fn load_public_key(value: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
    let pem = if value.trim_start().starts_with("-----BEGIN") {
        value.to_owned()
    } else {
        std::fs::read_to_string(value)
            .map_err(|e| AuthError::PublicKey(format!("cannot read {value}: {e}")))?
    };
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        return Ok((key, Algorithm::ES256));
    }
    Err(AuthError::PublicKey(
        "not an RSA or EC (P-256) public key in PEM form".into(),
    ))
}

/// The secret in `data_dir/jwt-secret`, created with 32 random bytes on first use, so that a
/// development server and `herald token` agree without anyone choosing a secret.
pub fn dev_secret(data_dir: &Path) -> Result<Secret, AuthError> {
    let path = data_dir.join("jwt-secret");
    let fail = |reason: String| AuthError::DevSecret {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(Secret::new(text.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    std::fs::create_dir_all(data_dir).map_err(|e| fail(e.to_string()))?;
    let secret = crate::random_id(43);
    write_private(&path, &secret).map_err(|e| fail(e.to_string()))?;
    Ok(Secret::new(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// A user id (`sub`) must name a valid personal room (`user:<sub>`), which bounds its length
/// and charset: letters, digits and `_ - : . @ / = + |`, so identity providers' ids such as
/// `auth0|…` pass.
pub fn check_subject(sub: &str) -> Result<(), AuthError> {
    let personal = RoomName::personal(&UserId::new(sub));
    if sub.is_empty() || RoomName::new(personal.as_str()).is_err() {
        return Err(AuthError::BadSubject(sub.to_owned()));
    }
    Ok(())
}

/// Mints an HS256 token for `sub`, valid for `ttl`, limited to `rooms` when given.
pub fn mint(
    secret: &Secret,
    sub: &str,
    rooms: Option<Vec<String>>,
    ttl: Duration,
) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: sub.to_owned(),
        exp: now + ttl.as_secs(),
        iat: Some(now),
        rooms,
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(mode: AuthMode) -> (Verifier, Secret) {
        let secret = Secret::new("test-secret-123");
        let config = Config {
            jwt_secret: Some(secret.clone()),
            auth: mode,
            ..Config::default()
        };
        (Verifier::from_config(&config).expect("keys"), secret)
    }

    fn room(name: &str) -> RoomName {
        RoomName::new(name).expect("valid room")
    }

    #[test]
    fn minted_tokens_verify_with_their_rooms() {
        let (v, secret) = verifier(AuthMode::On);
        let token = mint(
            &secret,
            "alice",
            Some(vec!["chat:*".into()]),
            Duration::from_secs(60),
        )
        .expect("mint");
        let id = v.verify(Some(&token)).expect("valid token");
        assert_eq!(id.user.as_str(), "alice");
        assert!(id.may_join(&room("chat:1")));
        assert!(!id.may_join(&room("admin")));
        assert!(id.may_join(&room("user:alice")));
        assert!(!id.may_join(&room("user:bob")));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let (v, _) = verifier(AuthMode::On);
        let other = mint(
            &Secret::new("another-secret"),
            "eve",
            None,
            Duration::from_secs(60),
        )
        .expect("mint");
        assert!(matches!(v.verify(Some(&other)), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify(None), Err(AuthError::Missing)));
        assert!(v.verify(Some("not-a-jwt")).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let (v, secret) = verifier(AuthMode::On);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = Claims {
            sub: "bob".into(),
            exp: now - 5,
            iat: None,
            rooms: None,
        };
        let key = EncodingKey::from_secret(secret.expose().as_bytes());
        let token = jsonwebtoken::encode(&Header::default(), &claims, &key).expect("encode");
        assert!(v.verify(Some(&token)).is_err());
    }

    #[test]
    fn tokens_not_valid_yet_are_refused() {
        let (v, secret) = verifier(AuthMode::On);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let key = EncodingKey::from_secret(secret.expose().as_bytes());
        let early = serde_json::json!({"sub": "carol", "exp": now + 7200, "nbf": now + 3600});
        let token = jsonwebtoken::encode(&Header::default(), &early, &key).expect("encode");
        assert!(v.verify(Some(&token)).is_err(), "nbf in the future");
        let ready = serde_json::json!({"sub": "carol", "exp": now + 7200, "nbf": now - 10});
        let token = jsonwebtoken::encode(&Header::default(), &ready, &key).expect("encode");
        assert!(v.verify(Some(&token)).is_ok(), "nbf in the past");
        let forever = serde_json::json!({"sub": "carol"});
        let token = jsonwebtoken::encode(&Header::default(), &forever, &key).expect("encode");
        assert!(
            v.verify(Some(&token)).is_err(),
            "a token without exp never expires"
        );
    }

    #[test]
    fn subjects_must_make_valid_room_names() {
        let (v, secret) = verifier(AuthMode::On);
        let token = mint(&secret, "bad user#1", None, Duration::from_secs(60)).expect("mint");
        assert!(matches!(
            v.verify(Some(&token)),
            Err(AuthError::BadSubject(_))
        ));
    }

    #[test]
    fn identity_provider_subjects_are_accepted() {
        let (v, secret) = verifier(AuthMode::On);
        for sub in [
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "google-oauth2|1043",
            "ann@example.com",
        ] {
            let token = mint(&secret, sub, None, Duration::from_secs(60)).expect("mint");
            let id = v.verify(Some(&token)).expect(sub);
            assert_eq!(id.user.as_str(), sub);
        }
        assert!(check_subject("").is_err());
        assert!(check_subject(&"a".repeat(123)).is_ok());
        assert!(
            check_subject(&"a".repeat(124)).is_err(),
            "user:<sub> fits in a room name"
        );
    }

    #[test]
    fn dev_mode_lets_anonymous_users_in() {
        let (v, _) = verifier(AuthMode::Off);
        let id = v.verify(None).expect("anonymous");
        assert!(id.user.as_str().starts_with("anon-"));
    }

    #[test]
    fn the_dev_secret_is_generated_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("herald-auth-{}", crate::random_id(6)));
        let first = dev_secret(&dir).expect("generated");
        let second = dev_secret(&dir).expect("reused");
        assert_eq!(first, second);
        assert!(first.expose().len() >= 32);
        let _ = std::fs::remove_dir_all(dir);
    }
}
