//! Fuzz target: the certificate signing request of a Join, signed by a real farm CA
//! (`Pki::sign_csr`). The first byte picks the form: even, the rest is the PEM text as sent;
//! odd, the rest is DER, wrapped in PEM here so the fuzzer reaches the DER parser directly.
#![no_main]

use archfarm_coordinator::pki::Pki;
use archfarm_proto::tls;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The join path refuses larger CSRs before parsing them.
const MAX_CSR_BYTES: usize = 64 * 1024;

fn pki() -> &'static Pki {
    static PKI: OnceLock<(tempfile::TempDir, Pki)> = OnceLock::new();
    &PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (pki, _) = Pki::load_or_create(dir.path(), &[]).expect("a farm CA");
        (dir, pki)
    })
    .1
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem(der: &[u8]) -> String {
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in base64(der).as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let csr = if form % 2 == 0 {
        match std::str::from_utf8(body) {
            Ok(text) => text.to_string(),
            Err(_) => return,
        }
    } else {
        pem(body)
    };
    if csr.len() > MAX_CSR_BYTES {
        return;
    }
    if let Ok((cert_pem, fingerprint)) = pki().sign_csr(&csr, "fuzz-agent-000000") {
        let certs = tls::parse_certs(&cert_pem).expect("the issued certificate parses");
        assert_eq!(certs.len(), 1);
        assert_eq!(tls::cert_fingerprint(&certs[0]), fingerprint);
    }
});
