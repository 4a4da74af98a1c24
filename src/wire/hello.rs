//! The hello that opens every connection of the same-host channel (see
//! `transport::quic::local`): 42 bytes, sent by the connecting rank before
//! anything else.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "RMLC"
//!      4     1  version (1)
//!      5     1  kind: 1 main connection, 2 one large message
//!      6     4  sender's rank, u32 little-endian
//!     10    32  secret: TLS exporter of the pair's QUIC connection
//! ```
//!
//! Decoding checks the layout only; whether the rank belongs to the job and
//! the secret to one of its QUIC connections is for the receiver to check.

/// Bytes of a hello.
pub const HELLO_LEN: usize = 4 + 1 + 1 + 4 + 32;
/// First bytes of a hello.
pub const HELLO_MAGIC: [u8; 4] = *b"RMLC";
/// Version of the hello (and of the channel's framing after it).
pub const HELLO_VERSION: u8 = 1;

/// What a connection of the same-host channel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloKind {
    /// The long-lived connection of one direction: small messages and the
    /// goodbye.
    Main,
    /// One large message.
    Message,
}

impl HelloKind {
    fn to_u8(self) -> u8 {
        match self {
            HelloKind::Main => 1,
            HelloKind::Message => 2,
        }
    }
}

/// A decoded hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// What the connection carries.
    pub kind: HelloKind,
    /// The rank the connecting process says it is.
    pub rank: u32,
    /// Proof of that: the TLS exporter secret of the pair's QUIC connection.
    pub secret: [u8; 32],
}

/// Why bytes are not a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloError {
    /// Fewer than [`HELLO_LEN`] bytes.
    Short(usize),
    /// The first four bytes are not [`HELLO_MAGIC`].
    Magic,
    /// A version this build does not speak.
    Version(u8),
    /// A connection kind this build does not know.
    Kind(u8),
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelloError::Short(n) => write!(f, "a hello of {n} bytes, fewer than {HELLO_LEN}"),
            HelloError::Magic => f.write_str("not a rankmesh same-host hello"),
            HelloError::Version(v) => write!(
                f,
                "same-host channel version {v}, this build speaks version {HELLO_VERSION}"
            ),
            HelloError::Kind(k) => write!(f, "unknown same-host connection kind {k}"),
        }
    }
}

impl std::error::Error for HelloError {}

impl Hello {
    /// The 42 bytes of this hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut h = [0u8; HELLO_LEN];
        h[..4].copy_from_slice(&HELLO_MAGIC);
        h[4] = HELLO_VERSION;
        h[5] = self.kind.to_u8();
        h[6..10].copy_from_slice(&self.rank.to_le_bytes());
        h[10..].copy_from_slice(&self.secret);
        h
    }

    /// Decode the first [`HELLO_LEN`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<Hello, HelloError> {
        let Some(b) = b.get(..HELLO_LEN) else {
            return Err(HelloError::Short(b.len()));
        };
        if b[..4] != HELLO_MAGIC {
            return Err(HelloError::Magic);
        }
        if b[4] != HELLO_VERSION {
            return Err(HelloError::Version(b[4]));
        }
        let kind = match b[5] {
            1 => HelloKind::Main,
            2 => HelloKind::Message,
            k => return Err(HelloError::Kind(k)),
        };
        let mut rank = [0u8; 4];
        rank.copy_from_slice(&b[6..10]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&b[10..HELLO_LEN]);
        Ok(Hello {
            kind,
            rank: u32::from_le_bytes(rank),
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_refusal() {
        let h = Hello {
            kind: HelloKind::Message,
            rank: 0x0102_0304,
            secret: [9; 32],
        };
        let b = h.encode();
        assert_eq!(&b[..6], b"RMLC\x01\x02");
        assert_eq!(&b[6..10], &[4, 3, 2, 1]);
        assert_eq!(Hello::decode(&b), Ok(h));
        // Trailing bytes (the frame after it) are not part of the hello.
        let mut longer = b.to_vec();
        longer.extend_from_slice(&[0xff; 10]);
        assert_eq!(Hello::decode(&longer), Ok(h));

        assert_eq!(Hello::decode(&b[..41]), Err(HelloError::Short(41)));
        assert_eq!(Hello::decode(&[]), Err(HelloError::Short(0)));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Hello::decode(&bad), Err(HelloError::Magic));
        let mut bad = b;
        bad[4] = 2;
        assert_eq!(Hello::decode(&bad), Err(HelloError::Version(2)));
        assert!(HelloError::Version(2).to_string().contains("version 1"));
        for k in [0u8, 3, 255] {
            let mut bad = b;
            bad[5] = k;
            assert_eq!(Hello::decode(&bad), Err(HelloError::Kind(k)));
        }
    }
}
