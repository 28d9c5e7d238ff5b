//! One module per stage kind.

use rlhf_engine::Registry;

/// Registers every stage kind of this crate.
pub fn register_all(registry: &mut Registry) {
    let _ = registry;
}
