use std::path::{Path, PathBuf};
pub fn write_all(_dir: &Path) -> std::io::Result<Vec<PathBuf>> { Ok(vec![]) }
