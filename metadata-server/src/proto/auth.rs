//! Mutual authentication with the cluster secret: each side proves it knows the secret by
//! an HMAC-SHA256 over both challenges and the hello fields (PROTOCOL.md §3). The secret
//! never crosses the wire. This module computes and checks proofs; it does no I/O.

use super::frame::{ClientHello, NONCE_BYTES, PROOF_BYTES};
use crate::types::{Epoch, NodeId, VolumeId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Domain label of the coordinator's proof.
const SERVER_LABEL: &[u8] = b"csvfs-proto server proof v1";
/// Domain label of the node's proof.
const CLIENT_LABEL: &[u8] = b"csvfs-proto client proof v1";

/// Everything both proofs are bound to: the two challenges and the negotiated session
/// parameters, so a proof cannot be replayed on another connection or another volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The negotiated protocol version.
    pub version: u32,
    /// The node.
    pub node: NodeId,
    /// The volume the coordinator serves.
    pub volume: VolumeId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// The node's challenge.
    pub client_nonce: [u8; NONCE_BYTES],
    /// The coordinator's challenge.
    pub server_nonce: [u8; NONCE_BYTES],
}

impl Transcript {
    /// The transcript of a session opened by `hello` and answered with these values.
    pub fn new(
        hello: &ClientHello,
        version: u32,
        volume: VolumeId,
        epoch: Epoch,
        server_nonce: [u8; NONCE_BYTES],
    ) -> Transcript {
        Transcript {
            version,
            node: hello.node,
            volume,
            epoch,
            client_nonce: hello.nonce,
            server_nonce,
        }
    }

    fn mac(&self, secret: &[u8], label: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice never fails for HMAC.
        let mut mac = match HmacSha256::new_from_slice(secret) {
            Ok(m) => m,
            Err(_) => unreachable_hmac_key(),
        };
        mac.update(label);
        mac.update(&self.version.to_le_bytes());
        mac.update(&self.node.0.to_le_bytes());
        mac.update(&self.volume.0);
        mac.update(&self.epoch.0.to_le_bytes());
        mac.update(&self.client_nonce);
        mac.update(&self.server_nonce);
        mac
    }

    /// The coordinator's proof.
    pub fn server_proof(&self, secret: &[u8]) -> [u8; PROOF_BYTES] {
        self.mac(secret, SERVER_LABEL)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The node's proof.
    pub fn client_proof(&self, secret: &[u8]) -> [u8; PROOF_BYTES] {
        self.mac(secret, CLIENT_LABEL)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the coordinator's proof in constant time.
    pub fn verify_server(&self, secret: &[u8], proof: &[u8; PROOF_BYTES]) -> bool {
        self.mac(secret, SERVER_LABEL).verify_slice(proof).is_ok()
    }

    /// Checks the node's proof in constant time.
    pub fn verify_client(&self, secret: &[u8], proof: &[u8; PROOF_BYTES]) -> bool {
        self.mac(secret, CLIENT_LABEL).verify_slice(proof).is_ok()
    }
}

#[cold]
fn unreachable_hmac_key() -> ! {
    // hmac's `new_from_slice` only fails for MACs with a fixed key size; HMAC has none.
    unreachable!("HMAC-SHA256 accepts keys of every length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transcript {
        Transcript {
            version: 2,
            node: NodeId(2),
            volume: VolumeId([1; 16]),
            epoch: Epoch(3),
            client_nonce: [4; NONCE_BYTES],
            server_nonce: [5; NONCE_BYTES],
        }
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_transcript() {
        let secret = b"cluster secret";
        let p = t().server_proof(secret);
        assert!(t().verify_server(secret, &p));
        assert!(!t().verify_server(b"other", &p));
        assert!(
            !t().verify_client(secret, &p),
            "labels separate the two proofs"
        );
        let mut other = t();
        other.server_nonce[0] ^= 1;
        assert!(!other.verify_server(secret, &p));
        let c = t().client_proof(secret);
        assert!(t().verify_client(secret, &c));
        assert_ne!(c, p);
    }
}
