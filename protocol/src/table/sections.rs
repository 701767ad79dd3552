//! A table as a set of named resources: its sections. The control plane's delta pushes
//! (`dmsc-ctl/1`, `docs/CONTROL.md` section 6) replace whole sections of a table the gateway
//! holds; each section's version is the SHA-256 of its body, so both sides can tell which
//! sections differ without holding the other's table.

use super::{Table, TableError, FORMAT_VERSION, MAGIC, MAX_TABLE_BYTES};
use crate::varint;

/// The version of one section: the SHA-256 of its body.
pub type SectionVersion = [u8; 32];

/// One section of an encoded table: its type and its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionRef<'a> {
    /// The section type (`section::*`, or an extension type).
    pub ty: u64,
    /// The body, exactly as encoded.
    pub body: &'a [u8],
}

impl Table {
    /// The table's sections, in order.
    pub fn sections(&self) -> Vec<SectionRef<'_>> {
        // A `Table` holds a canonical encoding, which always splits.
        split(self.encoded()).unwrap_or_default()
    }

    /// Each section's type and version, in order: what a gateway holding this table
    /// announces in `HELLO`.
    pub fn section_versions(&self) -> Vec<(u64, SectionVersion)> {
        self.sections()
            .iter()
            .map(|s| (s.ty, section_version(s.body)))
            .collect()
    }
}

/// The version of a section body.
pub fn section_version(body: &[u8]) -> SectionVersion {
    super::Generation::of(body).0
}

/// Splits an encoded table into its sections, checking only the layout (magic, version,
/// section order, non-empty bodies), not the bodies.
pub fn split(bytes: &[u8]) -> Result<Vec<SectionRef<'_>>, TableError> {
    if bytes.len() > MAX_TABLE_BYTES {
        return Err(TableError::TooLarge {
            len: bytes.len(),
            limit: MAX_TABLE_BYTES,
        });
    }
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(TableError::BadMagic);
    }
    let mut rest = &bytes[MAGIC.len()..];
    let (version, n) = next_varint(rest, "format version")?;
    if version != FORMAT_VERSION {
        return Err(TableError::UnsupportedVersion(version));
    }
    rest = &rest[n..];
    let mut out: Vec<SectionRef<'_>> = Vec::new();
    while !rest.is_empty() {
        let (ty, n) = next_varint(rest, "section type")?;
        rest = &rest[n..];
        if out.last().is_some_and(|last| ty <= last.ty) {
            return Err(TableError::NotCanonical(
                "sections out of order or repeated",
            ));
        }
        let (len, n) = next_varint(rest, "section body")?;
        rest = &rest[n..];
        if len as usize > rest.len() || len > MAX_TABLE_BYTES as u64 {
            return Err(crate::DecodeError::Truncated {
                what: "section body",
            }
            .into());
        }
        let (body, tail) = rest.split_at(len as usize);
        if body.is_empty() {
            return Err(TableError::NotCanonical("empty section"));
        }
        out.push(SectionRef { ty, body });
        rest = tail;
    }
    Ok(out)
}

fn next_varint(buf: &[u8], what: &'static str) -> Result<(u64, usize), TableError> {
    match varint::decode(buf)? {
        Some(v) => Ok(v),
        None => Err(crate::DecodeError::Truncated { what }.into()),
    }
}

/// Why a delta could not be applied to the held table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta names one section type twice (in its upserts, or in both lists).
    #[error("section {0:#x} is named twice in the delta")]
    Duplicate(u64),
    /// The delta removes a section the held table does not have.
    #[error("section {0:#x} is removed but not held")]
    RemovesAbsent(u64),
    /// The merged table is not a valid table.
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Applies a delta to `base`: replaces or adds every section of `upserts`, drops every section
/// type in `removes`, and decodes and validates the result (which is therefore canonical).
pub fn apply_delta(
    base: &Table,
    upserts: &[SectionRef<'_>],
    removes: &[u64],
) -> Result<Table, DeltaError> {
    let mut seen = hashbrown::HashSet::with_capacity(upserts.len() + removes.len());
    for ty in upserts.iter().map(|s| s.ty).chain(removes.iter().copied()) {
        if !seen.insert(ty) {
            return Err(DeltaError::Duplicate(ty));
        }
    }
    let held = base.sections();
    for ty in removes {
        if !held.iter().any(|s| s.ty == *ty) {
            return Err(DeltaError::RemovesAbsent(*ty));
        }
    }
    let mut merged: Vec<SectionRef<'_>> = held
        .into_iter()
        .filter(|s| !removes.contains(&s.ty) && !upserts.iter().any(|u| u.ty == s.ty))
        .chain(upserts.iter().copied())
        .collect();
    merged.sort_by_key(|s| s.ty);
    let mut out = Vec::with_capacity(
        merged.iter().map(|s| s.body.len() + 16).sum::<usize>() + MAGIC.len() + 1,
    );
    out.extend_from_slice(&MAGIC);
    varint::encode(FORMAT_VERSION, &mut out);
    for s in &merged {
        varint::encode(s.ty, &mut out);
        varint::encode(s.body.len() as u64, &mut out);
        out.extend_from_slice(s.body);
        if out.len() > MAX_TABLE_BYTES {
            return Err(TableError::TooLarge {
                len: out.len(),
                limit: MAX_TABLE_BYTES,
            }
            .into());
        }
    }
    Ok(Table::decode(&out)?)
}

/// What a delta from a table whose sections have versions `held` to `target` must carry:
/// the target's sections whose version differs or that are not held (upserts), and the held
/// section types the target lacks (removes).
pub fn diff<'t>(
    held: &[(u64, SectionVersion)],
    target: &'t Table,
) -> (Vec<SectionRef<'t>>, Vec<u64>) {
    let sections = target.sections();
    let upserts = sections
        .iter()
        .filter(|s| {
            !held
                .iter()
                .any(|(ty, v)| *ty == s.ty && *v == section_version(s.body))
        })
        .copied()
        .collect();
    let removes = held
        .iter()
        .map(|(ty, _)| *ty)
        .filter(|ty| !sections.iter().any(|s| s.ty == *ty))
        .collect();
    (upserts, removes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Generation, TableParts};

    fn table(groups: &[&str], gateways: &[&str]) -> Table {
        Table::new(TableParts {
            domain: "dmsc.local".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            gateways: gateways.iter().map(|g| g.to_string()).collect(),
            ..TableParts::default()
        })
        .unwrap()
    }

    #[test]
    fn a_diff_applied_to_the_base_gives_the_target() {
        let base = table(&["a"], &["gw1"]);
        for target in [
            table(&["a", "b"], &["gw1"]),
            table(&[], &["gw1"]),
            table(&["a"], &[]),
            table(&[], &[]),
            base.clone(),
        ] {
            let (upserts, removes) = diff(&base.section_versions(), &target);
            let merged = apply_delta(&base, &upserts, &removes).unwrap();
            assert_eq!(merged.generation(), target.generation());
            assert_eq!(merged.encoded(), target.encoded());
        }
        // Only what changed travels.
        let target = table(&["a", "b"], &["gw1"]);
        let (upserts, removes) = diff(&base.section_versions(), &target);
        assert_eq!(upserts.len(), 1);
        assert_eq!(upserts[0].ty, crate::table::section::GROUPS);
        assert!(removes.is_empty());
    }

    #[test]
    fn bad_deltas_are_refused() {
        let base = table(&["a"], &[]);
        assert_eq!(
            apply_delta(&base, &[], &[crate::table::section::GATEWAYS]),
            Err(DeltaError::RemovesAbsent(crate::table::section::GATEWAYS))
        );
        let twice = [
            SectionRef {
                ty: 3,
                body: b"\x01\x01b",
            },
            SectionRef {
                ty: 3,
                body: b"\x01\x01c",
            },
        ];
        assert_eq!(
            apply_delta(&base, &twice, &[]),
            Err(DeltaError::Duplicate(3))
        );
        // A section body that does not decode.
        let bad = [SectionRef {
            ty: 3,
            body: b"\x05",
        }];
        assert!(matches!(
            apply_delta(&base, &bad, &[]),
            Err(DeltaError::Table(_))
        ));
        // Removing the required domain section.
        assert!(matches!(
            apply_delta(&base, &[], &[crate::table::section::DOMAIN]),
            Err(DeltaError::Table(_))
        ));
        let _ = Generation([0; 32]);
    }

    #[test]
    fn split_checks_the_layout() {
        let t = table(&["a"], &["gw1"]);
        assert_eq!(split(t.encoded()).unwrap().len(), 3);
        assert_eq!(split(b"DMTX\x01"), Err(TableError::BadMagic));
        assert!(split(b"DMTB\x01\x03\x05ab").is_err());
    }

    proptest::proptest! {
        /// Between any two tables, the diff applied to the first gives the second, byte for
        /// byte; and arbitrary upserts never panic.
        #[test]
        fn any_diff_applies(
            a_groups in proptest::collection::btree_set("[a-z]{1,6}", 0..5),
            b_groups in proptest::collection::btree_set("[a-z]{1,6}", 0..5),
            a_gateways in proptest::collection::btree_set("[a-z0-9]{1,4}", 0..3),
            b_gateways in proptest::collection::btree_set("[a-z0-9]{1,4}", 0..3),
            junk in proptest::collection::vec((1u64..12, proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16)), 0..3),
        ) {
            let make = |groups: &std::collections::BTreeSet<String>, gateways: &std::collections::BTreeSet<String>| {
                Table::new(TableParts {
                    domain: "dmsc.local".into(),
                    groups: groups.iter().cloned().collect(),
                    gateways: gateways.iter().cloned().collect(),
                    ..TableParts::default()
                })
                .unwrap()
            };
            let (a, b) = (make(&a_groups, &a_gateways), make(&b_groups, &b_gateways));
            let (upserts, removes) = diff(&a.section_versions(), &b);
            let merged = apply_delta(&a, &upserts, &removes).unwrap();
            proptest::prop_assert_eq!(merged.encoded(), b.encoded());
            let mut seen = std::collections::BTreeSet::new();
            let junk: Vec<SectionRef<'_>> = junk
                .iter()
                .filter(|(ty, _)| seen.insert(*ty))
                .map(|(ty, body)| SectionRef { ty: *ty, body })
                .collect();
            let _ = apply_delta(&a, &junk, &[]);
        }
    }
}
