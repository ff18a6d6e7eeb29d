//! RFC 8452 (AES-GCM-SIV) known-answer tests through keygate's own wrapper,
//! `kms_core::crypto::Aead`, which lays messages out as `nonce ‖ ct ‖ tag`.
//!
//! Vectors: RFC 8452, Appendix C.2 ("AEAD_AES_256_GCM_SIV"), cases 1 and 8
//! (all-zero-ish keys) and the last three of the randomized-key cases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code

use data_encoding::HEXLOWER;
use kms_core::Key256;
use kms_core::crypto::Aead;

struct Vector {
    key: &'static str,
    nonce: &'static str,
    aad: &'static str,
    plaintext: &'static str,
    /// RFC's "Result": ciphertext ‖ tag.
    result: &'static str,
}

const APPENDIX_C2: &[Vector] = &[
    Vector {
        key: "0100000000000000000000000000000000000000000000000000000000000000",
        nonce: "030000000000000000000000",
        aad: "",
        plaintext: "",
        result: "07f5f4169bbf55a8400cd47ea6fd400f",
    },
    Vector {
        key: "0100000000000000000000000000000000000000000000000000000000000000",
        nonce: "030000000000000000000000",
        aad: "01",
        plaintext: "0200000000000000",
        result: "1de22967237a813291213f267e3b452f02d01ae33e4ec854",
    },
    Vector {
        key: "a44102952ef94b02b805249bac80e6f61455bfac8308a2d40d8c845117808235",
        nonce: "5c9e940fea2f582950a70d5a",
        aad: "0da55210cc1c1b0abde3b2f204d1e9f8b06bc47f",
        plaintext: "1db2316fd568378da107b52b",
        result: "8dbeb9f7255bf5769dd56692404099c2587f64979f21826706d497d5",
    },
    Vector {
        key: "9745b3d1ae06556fb6aa7890bebc18fe6b3db4da3d57aa94842b9803a96e07fb",
        nonce: "6de71860f762ebfbd08284e4",
        aad: "f37de21c7ff901cfe8a69615a93fdf7a98cad481796245709f",
        plaintext: "21702de0de18baa9c9596291b08466",
        result: "793576dfa5c0f88729a7ed3c2f1bffb3080d28f6ebb5d3648ce97bd5ba67fd",
    },
    Vector {
        key: "3c535de192eaed3822a2fbbe2ca9dfc88255e14a661b8aa82cc54236093bbc23",
        nonce: "688089e55540db1872504e1c",
        aad: "734320ccc9d9bbbb19cb81b2af4ecbc3e72834321f7aa0f70b7282b4f33df23f167541",
        plaintext: "ced532ce4159b035277d4dfbb7db62968b13cd4eec",
        result: "626660c26ea6612fb17ad91e8e767639edd6c9faee9d6c7029675b89eaf4ba1ded1a286594",
    },
];

fn hex(s: &str) -> Vec<u8> {
    HEXLOWER.decode(s.as_bytes()).unwrap()
}

#[test]
fn appendix_c2_seal_and_open() {
    for v in APPENDIX_C2 {
        let aead = Aead::new(&Key256::from_slice(&hex(v.key)).unwrap());
        let nonce: [u8; 12] = hex(v.nonce).try_into().unwrap();
        let mut sealed = Vec::new();
        aead.seal_with_nonce(&nonce, &hex(v.aad), &hex(v.plaintext), &mut sealed);
        let mut expected = nonce.to_vec();
        expected.extend(hex(v.result));
        assert_eq!(HEXLOWER.encode(&sealed), HEXLOWER.encode(&expected), "key {}", v.key);
        let opened = aead.open(&expected, &hex(v.aad)).unwrap();
        assert_eq!(opened.as_slice(), hex(v.plaintext).as_slice());
    }
}

#[test]
fn appendix_c2_results_with_a_flipped_bit_fail() {
    for v in APPENDIX_C2 {
        let aead = Aead::new(&Key256::from_slice(&hex(v.key)).unwrap());
        let mut sealed = hex(v.nonce);
        sealed.extend(hex(v.result));
        let last = sealed.len() - 1;
        sealed[last] ^= 0x80;
        assert!(aead.open(&sealed, &hex(v.aad)).is_err());
    }
}
