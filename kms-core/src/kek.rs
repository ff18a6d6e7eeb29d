//! KEK version states and the transitions between them (DESIGN §2, §7).

use std::fmt;
use std::str::FromStr;

/// The state of one tenant KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KekState {
    /// New DEKs are wrapped under it. Exactly one version per tenant.
    Active,
    /// Unwraps existing DEKs; issues none.
    DecryptOnly,
    /// Refuses everything; reversible.
    Disabled,
    /// Material erased; irreversible.
    Destroyed,
}

/// A state change an operator can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// Disabled → decrypt-only.
    Enable,
    /// Decrypt-only → disabled.
    Disable,
    /// Disabled → decrypt-only (same as enable; named for the CLI).
    DecryptOnly,
    /// Decrypt-only or disabled → destroyed (crypto-shredding; only through
    /// an approved shred request). Idempotent.
    Destroy,
}

/// A state change that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {change:?} a KEK version that is {from}: {why}")]
#[non_exhaustive]
pub struct InvalidTransition {
    /// Current state.
    pub from: KekState,
    /// Requested change.
    pub change: StateChange,
    /// Why not.
    pub why: &'static str,
}

impl KekState {
    /// Stable name (stored in the keystore and shown in APIs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::DecryptOnly => "decrypt_only",
            Self::Disabled => "disabled",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether DEKs wrapped under a version in this state may be unwrapped.
    pub fn can_unwrap(self) -> bool {
        matches!(self, Self::Active | Self::DecryptOnly)
    }

    /// The state after `change`, if allowed. The active version only stops
    /// being active through a rotation, and nothing leaves `destroyed`.
    pub fn apply(self, change: StateChange) -> Result<Self, InvalidTransition> {
        let deny = |why| Err(InvalidTransition { from: self, change, why });
        match (self, change) {
            (Self::Destroyed, StateChange::Destroy) => Ok(Self::Destroyed),
            (Self::Destroyed, _) => deny("destruction is irreversible"),
            (Self::Active, StateChange::Destroy) => {
                deny("rotate to a new version first, or shred the whole tenant")
            }
            (Self::Active, _) => deny("rotate to a new version first"),
            (Self::DecryptOnly | Self::Disabled, StateChange::Destroy) => Ok(Self::Destroyed),
            (Self::DecryptOnly | Self::Disabled, StateChange::Disable) => Ok(Self::Disabled),
            (
                Self::DecryptOnly | Self::Disabled,
                StateChange::Enable | StateChange::DecryptOnly,
            ) => Ok(Self::DecryptOnly),
        }
    }
}

impl fmt::Display for KekState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KekState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "active" => Ok(Self::Active),
            "decrypt_only" => Ok(Self::DecryptOnly),
            "disabled" => Ok(Self::Disabled),
            "destroyed" => Ok(Self::Destroyed),
            _ => Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use KekState::*;
        assert_eq!(DecryptOnly.apply(StateChange::Disable), Ok(Disabled));
        assert_eq!(Disabled.apply(StateChange::Enable), Ok(DecryptOnly));
        assert!(Active.apply(StateChange::Disable).is_err());
        assert!(Destroyed.apply(StateChange::Enable).is_err());
        assert_eq!(DecryptOnly.apply(StateChange::Destroy), Ok(Destroyed));
        assert_eq!(Disabled.apply(StateChange::Destroy), Ok(Destroyed));
        assert_eq!(Destroyed.apply(StateChange::Destroy), Ok(Destroyed));
        assert!(Active.apply(StateChange::Destroy).is_err());
        for s in [Active, DecryptOnly, Disabled, Destroyed] {
            assert_eq!(s.as_str().parse(), Ok(s));
        }
    }
}
