//! [`SchemaRef`]: a schema by name, at its latest or a pinned version.

/// The schema to encrypt under: a name (`"patient"` converts into one, and
/// means the schema's latest version) or a name and a pinned version.
///
/// ```
/// use keygate_sdk::SchemaRef;
///
/// let latest: SchemaRef<'_> = "patient".into();
/// assert_eq!(latest.version(), None);
/// assert_eq!(SchemaRef::pinned("patient", 1).version(), Some(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SchemaRef<'a> {
    name: &'a str,
    version: Option<u32>,
}

impl<'a> SchemaRef<'a> {
    /// The latest version of the schema `name`.
    pub fn latest(name: &'a str) -> Self {
        Self { name, version: None }
    }

    /// Version `version` of the schema `name`.
    pub fn pinned(name: &'a str, version: u32) -> Self {
        Self { name, version: Some(version) }
    }

    /// The schema's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The pinned version, or `None` for the latest.
    pub fn version(&self) -> Option<u32> {
        self.version
    }
}

impl<'a> From<&'a str> for SchemaRef<'a> {
    fn from(name: &'a str) -> Self {
        Self::latest(name)
    }
}

impl<'a> From<&'a String> for SchemaRef<'a> {
    fn from(name: &'a String) -> Self {
        Self::latest(name)
    }
}
