//! A seeded, deterministic generator of `patient` records (about 0.5 KiB
//! of JSON each) for the sample schema `keygate up` installs: six
//! protected values per record — `/ssn` (randomized, masked), `/mrn`
//! (deterministic), `/email` (blind index, masked), `/diagnosis`
//! (randomized), `/patient_id` (pseudonym) and one `/allergies/*` element
//! (randomized) — among unprotected demographic and administrative fields.
//!
//! The same seed and index always give the same record, on every machine,
//! so runs compare like with like. Not a source of secrets: SplitMix64.

use serde_json::{Value, json};

/// The JSON pointers the sample schema protects in a generated record, in
/// the order a peer (OpenBao) receives them.
pub(crate) const PROTECTED: [&str; 6] =
    ["/ssn", "/mrn", "/email", "/diagnosis", "/patient_id", "/allergies/0"];

const GIVEN: &[&str] = &[
    "Jane", "John", "Maria", "Wei", "Aisha", "Lars", "Priya", "Tomasz", "Emeka", "Sofia", "Kenji",
    "Fatima", "Oliver", "Ines", "Mateo", "Hannah",
];
const FAMILY: &[&str] = &[
    "Roe", "Doe", "Garcia", "Chen", "Okafor", "Nilsson", "Patel", "Kowalski", "Mbeki", "Rossi",
    "Tanaka", "Haddad", "Smith", "Moreau", "Silva", "Becker",
];
const STREETS: &[&str] = &["Elm Street", "Harbor Road", "Maple Avenue", "Station Lane", "Mill Way"];
const CITIES: &[(&str, &str)] = &[
    ("Springfield", "MA"),
    ("Portland", "OR"),
    ("Madison", "WI"),
    ("Austin", "TX"),
    ("Raleigh", "NC"),
];
const DIAGNOSES: &[&str] = &[
    "C50.911 Malignant neoplasm of unspecified site of right female breast",
    "C34.90 Malignant neoplasm of unspecified part of unspecified bronchus or lung",
    "C18.7 Malignant neoplasm of sigmoid colon",
    "C61 Malignant neoplasm of prostate",
    "C43.59 Malignant melanoma of other part of trunk",
    "C91.10 Chronic lymphocytic leukemia of B-cell type not having achieved remission",
];
const ALLERGIES: &[&str] = &["penicillin", "latex", "sulfonamides", "iodinated contrast", "none"];
const PAYERS: &[&str] = &["Acme Health", "Blue Lake Mutual", "Northwind Care", "Medicare"];
const WARDS: &[&str] = &["oncology-3", "infusion-1", "radiology-2", "outpatient"];

/// SplitMix64: tiny, fast, deterministic; for test data only.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T], fallback: T) -> T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        items.get(i).copied().unwrap_or(fallback)
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + (self.below(10) as u8))).collect()
    }
}

/// Record number `index` of the set seeded with `seed`.
pub(crate) fn patient(seed: u64, index: u64) -> Value {
    let mut r = SplitMix(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let given = r.pick(GIVEN, "Jane");
    let family = r.pick(FAMILY, "Roe");
    let (city, state) = r.pick(CITIES, ("Springfield", "MA"));
    let year = 1930 + r.below(75);
    let birth = format!("{year}-{:02}-{:02}", 1 + r.below(12), 1 + r.below(28));
    json!({
        "name": format!("{given} {family}"),
        "birth_date": birth,
        "sex": r.pick(&["F", "M", "X"], "X"),
        "address": {
            "street": format!("{} {}", 1 + r.below(9_000), r.pick(STREETS, "Elm Street")),
            "city": city, "state": state, "postal_code": r.digits(5), "country": "US",
        },
        "phone": format!("+1 {} 555 {}", r.digits(3), r.digits(4)),
        "ssn": format!("{}-{}-{}", r.digits(3), r.digits(2), r.digits(4)),
        "mrn": format!("MRN-{index:08}"),
        "email": format!("{}.{}{}@example.org", given, family, r.below(1_000)),
        "diagnosis": r.pick(DIAGNOSES, "C61 Malignant neoplasm of prostate"),
        "patient_id": format!("P-{:010}", r.below(10_000_000_000)),
        "allergies": [r.pick(ALLERGIES, "none")],
        "age": 2026 - year,
        "insurance": {
            "payer": r.pick(PAYERS, "Medicare"),
            "plan": format!("PPO-{}", 1 + r.below(5)),
            "member_id": format!("M{}", r.digits(9)),
        },
        "encounter": {
            "admitted": format!("2026-{:02}-{:02}T{:02}:{:02}:00Z", 1 + r.below(12), 1 + r.below(28), r.below(24), r.below(60)),
            "ward": r.pick(WARDS, "outpatient"),
        },
    })
}

/// Records `0..count` of the set seeded with `seed`.
pub(crate) fn patients(seed: u64, count: usize) -> Vec<Value> {
    (0..count as u64).map(|i| patient(seed, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_about_half_a_kib_and_six_protected_values() {
        let a = patients(7, 200);
        assert_eq!(a, patients(7, 200), "same seed, same records");
        assert_ne!(a, patients(8, 200), "another seed, other records");
        let sizes: Vec<usize> = a.iter().map(|r| serde_json::to_vec(r).unwrap().len()).collect();
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((448..=576).contains(&mean), "mean size {mean}");
        for record in &a {
            for pointer in PROTECTED {
                assert!(record.pointer(pointer).is_some(), "{pointer}");
            }
        }
    }
}
