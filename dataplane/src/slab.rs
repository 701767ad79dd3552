//! A generational slab: values in reusable slots, named by keys that carry the generation of
//! the slot's occupant, so a key kept after its value was removed (and the slot reused) is
//! recognised as stale instead of reaching the new occupant.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

/// Names a value in a [`Slab`] whose key tag is `T` (by default the value type itself).
pub struct Key<T> {
    index: u32,
    generation: u32,
    kind: PhantomData<fn() -> T>,
}

impl<T> Key<T> {
    /// The slot index (for dense side tables indexed like the slab).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

// Implemented by hand: deriving would demand the same traits of `T`.
impl<T> Clone for Key<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Key<T> {}

impl<T> PartialEq for Key<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.generation == other.generation
    }
}

impl<T> Eq for Key<T> {}

impl<T> PartialOrd for Key<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Key<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.index, self.generation).cmp(&(other.index, other.generation))
    }
}

impl<T> Hash for Key<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.index.hash(state);
        self.generation.hash(state);
    }
}

impl<T> fmt::Debug for Key<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}v{}", self.index, self.generation)
    }
}

struct Slot<T> {
    /// Bumped each time the slot is vacated.
    generation: u32,
    value: Option<T>,
}

/// Values of type `T` in reusable slots, named by [`Key<K>`]s.
pub struct Slab<T, K = T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
    tag: PhantomData<fn() -> K>,
}

impl<T, K> Default for Slab<T, K> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            tag: PhantomData,
        }
    }
}

impl<T, K> fmt::Debug for Slab<T, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slab")
            .field("len", &self.len)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<T, K> Slab<T, K> {
    /// Stores `value` (in a vacated slot if there is one) and returns its key.
    pub fn insert(&mut self, value: T) -> Key<K> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let key = Key {
            index,
            generation: slot.generation,
            kind: PhantomData,
        };
        slot.value = Some(value);
        self.len += 1;
        key
    }

    /// The value of `key`, unless it was removed.
    pub fn get(&self, key: Key<K>) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        slot.value
            .as_ref()
            .filter(|_| slot.generation == key.generation)
    }

    /// The value of `key`, unless it was removed.
    pub fn get_mut(&mut self, key: Key<K>) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        slot.value
            .as_mut()
            .filter(|_| slot.generation == key.generation)
    }

    /// Removes and returns the value of `key`; its key (and every copy) goes stale.
    pub fn remove(&mut self, key: Key<K>) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value with its key.
    pub fn iter(&self) -> impl Iterator<Item = (Key<K>, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, slot)| {
            let key = Key {
                index: i as u32,
                generation: slot.generation,
                kind: PhantomData,
            };
            Some((key, slot.value.as_ref()?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_kept_after_removal_is_stale_even_when_the_slot_is_reused() {
        let mut s: Slab<&str> = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let c = s.insert("c");
        assert_eq!(c.index(), a.index(), "the slot is reused");
        assert_ne!(c, a);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        assert_eq!(s.get(b), Some(&"b"));
        let keys: Vec<_> = s.iter().map(|(k, v)| (k, *v)).collect();
        assert_eq!(keys, vec![(c, "c"), (b, "b")]);
    }
}
