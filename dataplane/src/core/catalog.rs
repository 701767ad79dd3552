//! What discovery answers from: every capability offered on the gateway, in name order, with
//! the sessions offering it. Kept up to date as agents come, change their cards, start to detach
//! and go, at a cost proportional to the agent's capabilities; a `DISCOVER` then reads only the
//! capabilities that match its prefix instead of scanning every agent's card.

use std::collections::BTreeMap;
use std::ops::Bound;

use hashbrown::HashSet;

use dmsc_protocol::control::SessionId;

#[derive(Debug, Default)]
pub(super) struct Catalog {
    by_name: BTreeMap<Box<str>, HashSet<SessionId>>,
}

impl Catalog {
    /// `session` offers `capabilities`.
    pub(super) fn add(&mut self, session: SessionId, capabilities: &[Box<str>]) {
        for c in capabilities {
            self.by_name.entry(c.clone()).or_default().insert(session);
        }
    }

    /// `session` no longer offers `capabilities` (a no-op for those it did not offer).
    pub(super) fn remove(&mut self, session: SessionId, capabilities: &[Box<str>]) {
        for c in capabilities {
            if let Some(providers) = self.by_name.get_mut(&**c) {
                providers.remove(&session);
                if providers.is_empty() {
                    self.by_name.remove(&**c);
                }
            }
        }
    }

    /// The capabilities whose name starts with `prefix`, in name order, with their providers.
    pub(super) fn matching<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a HashSet<SessionId>)> + 'a {
        self.by_name
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(name, _)| name.starts_with(prefix))
            .map(|(name, providers)| (&**name, providers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|n| Box::from(*n)).collect()
    }

    #[test]
    fn prefix_queries_see_exactly_the_current_offers_in_name_order() {
        let mut c = Catalog::default();
        c.add(SessionId(1), &caps(&["translate", "summarize", "trace"]));
        c.add(SessionId(2), &caps(&["translate"]));
        let names = |c: &Catalog, p: &str| -> Vec<(String, usize)> {
            c.matching(p)
                .map(|(n, s)| (n.to_owned(), s.len()))
                .collect()
        };
        assert_eq!(
            names(&c, "tr"),
            vec![("trace".into(), 1), ("translate".into(), 2)]
        );
        assert_eq!(names(&c, "").len(), 3);
        assert!(names(&c, "x").is_empty());
        c.remove(SessionId(1), &caps(&["translate", "summarize", "trace"]));
        assert_eq!(names(&c, ""), vec![("translate".into(), 1)]);
        c.remove(SessionId(1), &caps(&["translate"]));
        assert_eq!(names(&c, ""), vec![("translate".into(), 1)]);
    }
}
