//! The datasets one daemon serves, by name: each loaded once (`--data
//! NAME=PATH`, repeatable) and prepared once, all sharing the daemon's
//! limits, memory budget and metrics. Requests name a dataset in their
//! `dataset` field; an empty one means "the only one".
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::budget::Budget;
use crate::batch::prepared::{Limits, Prepared};
use crate::device;
use crate::error::ServeError;
use crate::load::LoadOptions;
use crate::metrics::Metrics;
use crate::store::Dataset;

/// Most datasets one daemon serves. Each name becomes a metrics label
/// value and a line of every GetInfo answer; 64 is far more than a host's
/// RAM holds of real datasets and keeps both bounded.
pub const MAX_DATASETS: usize = 64;

/// Longest dataset name: a label value and a request field, not prose.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a dataset name: 1 to [`MAX_NAME_LEN`] ASCII letters, digits,
/// `_` and `-`, starting with a letter or digit. Why so strict: the name
/// travels in requests, metrics labels, log fields and URLs, where anything
/// else would need quoting.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() {
        return Err("a dataset name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "dataset name {:?}... is longer than {MAX_NAME_LEN} characters",
            name.chars().take(MAX_NAME_LEN).collect::<String>()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(ok_char) {
        return Err(format!(
            "dataset name {name:?} is not valid: use letters, digits, '_' and '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks every name, that no two are the same and their number.
pub fn check_names(names: &[&str]) -> Result<(), String> {
    if names.len() > MAX_DATASETS {
        return Err(format!(
            "{} datasets given; one daemon serves at most {MAX_DATASETS}",
            names.len()
        ));
    }
    for (i, name) in names.iter().enumerate() {
        check_name(name)?;
        if names[..i].contains(name) {
            return Err(format!(
                "two datasets are named {name:?}: give each --data its own NAME= (NAME=PATH)"
            ));
        }
    }
    Ok(())
}

/// The name of a dataset given without one (`--data PATH`): its file or
/// directory name up to the first dot (`mnist.pkl.gz` → `mnist`,
/// `cifar-10-python.tar.gz` → `cifar-10-python`, `fashion/` → `fashion`),
/// other characters than [`check_name`] allows replaced by `-`, cut to
/// [`MAX_NAME_LEN`]; `default` when nothing is left.
pub fn name_from_path(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file.split('.').next().unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    let name = name.trim_start_matches(['-', '_']).to_string();
    if name.is_empty() {
        "default".into()
    } else {
        name
    }
}

/// Loads the datasets `named` (name, path) at the same time, each on a
/// thread of its own. One load keeps two cores busy (the decompressor and
/// the prefaulter, `memory`), so this pays on hosts with cores to spare; on
/// this project's 2-core machine two full-size MNIST files took 2.05x the
/// time of one (bench/load.py, row ready-two), as one after the other
/// would. Names are checked first (a typo must
/// not cost a 10-second load); any failure stops it all, naming the dataset
/// and its file: no daemon serves half of what it was asked to.
/// `opts.max_bytes` bounds each file as it loads and then their total.
pub fn load(named: &[(String, PathBuf)], opts: &LoadOptions) -> anyhow::Result<Datasets> {
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    check_names(&names).map_err(anyhow::Error::msg)?;
    let loaded: Vec<anyhow::Result<Dataset>> = std::thread::scope(|scope| {
        let handles: Vec<_> = named
            .iter()
            .map(|(name, path)| {
                std::thread::Builder::new()
                    .name(format!("load-{name}"))
                    .spawn_scoped(scope, move || {
                        crate::load::load(path, opts).map_err(|e| {
                            anyhow::Error::from(e)
                                .context(format!("dataset {name:?} ({})", path.display()))
                        })
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a loading thread panicked"))),
                Err(e) => Err(anyhow::Error::from(e).context("cannot start a loading thread")),
            })
            .collect()
    });
    let mut out = Vec::with_capacity(named.len());
    for ((name, _), ds) in named.iter().zip(loaded) {
        out.push((name.clone(), Arc::new(ds?)));
    }
    let total: usize = out.iter().map(|(_, d)| d.memory_bytes).sum();
    if total > opts.max_bytes {
        anyhow::bail!(
            "the datasets hold {total} bytes together, more than --max-dataset-bytes {}",
            opts.max_bytes
        );
    }
    Datasets::new(out).map_err(anyhow::Error::msg)
}

/// Datasets as loaded, with their names (and their device copies, with
/// `--device`), before serving: checked for valid, distinct names and
/// their number.
#[derive(Clone)]
pub struct Datasets {
    named: Vec<(String, Arc<Dataset>)>,
    /// Per dataset, its copies on each device (empty without devices).
    copies: Vec<Vec<Arc<device::Copy>>>,
}

impl Datasets {
    /// Several named datasets, in the order requests list them.
    pub fn new(named: Vec<(String, Arc<Dataset>)>) -> Result<Self, String> {
        if named.is_empty() {
            return Err("no dataset to serve".into());
        }
        check_names(&named.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())?;
        Ok(Self {
            named,
            copies: Vec::new(),
        })
    }

    /// One dataset, named after its source (see [`name_from_path`]).
    pub fn one(dataset: Arc<Dataset>) -> Self {
        let name = name_from_path(Path::new(&dataset.source));
        Self {
            named: vec![(name, dataset)],
            copies: Vec::new(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Arc<Dataset>)> {
        self.named.iter()
    }

    /// Adds the device copies [`device::place`] made of these datasets.
    pub fn with_devices(mut self, copies: Vec<Vec<device::Copy>>) -> Self {
        assert_eq!(copies.len(), self.named.len(), "one list per dataset");
        self.copies = copies
            .into_iter()
            .map(|c| c.into_iter().map(Arc::new).collect())
            .collect();
        self
    }
}

impl From<Arc<Dataset>> for Datasets {
    fn from(d: Arc<Dataset>) -> Self {
        Self::one(d)
    }
}

/// The prepared datasets of a running daemon (see the module docs).
pub struct Catalog {
    datasets: Vec<Arc<Prepared>>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl Catalog {
    /// Prepares every dataset, all sharing one memory budget of `limits`.
    pub fn new(datasets: &Datasets, limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        let budget = Budget::new(limits.budget_bytes, limits.budget_wait, limits.budget_stall);
        metrics.set_budget(budget.clone());
        let datasets = datasets
            .iter()
            .enumerate()
            .map(|(i, (name, ds))| {
                let copies = datasets.copies.get(i).cloned().unwrap_or_default();
                for c in &copies {
                    metrics.device(name, c.device.uuid(), c.bytes() as u64);
                }
                Prepared::new(
                    name.clone(),
                    ds.clone(),
                    copies,
                    limits,
                    budget.clone(),
                    metrics.clone(),
                )
            })
            .collect();
        Arc::new(Self {
            datasets,
            limits,
            metrics,
        })
    }

    /// Every dataset, in `--data` order.
    pub fn all(&self) -> &[Arc<Prepared>] {
        &self.datasets
    }

    /// The dataset a request names: `name`, or with an empty name the only
    /// one. An unknown name is NOT_FOUND; an empty one with several
    /// datasets is INVALID_ARGUMENT; both list the names.
    pub fn get(&self, name: &str) -> Result<&Arc<Prepared>, ServeError> {
        let names = || self.datasets.iter().map(|p| p.name.as_str());
        match name {
            "" if self.datasets.len() == 1 => Ok(&self.datasets[0]),
            "" => Err(ServeError::dataset_needed(names())),
            _ => self
                .datasets
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| ServeError::unknown_dataset(name, names())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        for (path, name) in [
            ("/data/mnist.pkl.gz", "mnist"),
            ("cifar-10-python.tar.gz", "cifar-10-python"),
            ("/data/fashion/", "fashion"),
            ("/data/my data.npz", "my-data"),
            (".hidden.npz", "default"),
            ("/", "default"),
            ("_x.npz", "x"),
            ("Ünïcode.npz", "n-code"),
        ] {
            assert_eq!(name_from_path(Path::new(path)), name, "{path}");
            check_name(&name_from_path(Path::new(path))).unwrap();
        }
        let long = format!("{}.npz", "a".repeat(200));
        assert_eq!(name_from_path(Path::new(&long)).len(), MAX_NAME_LEN);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["mnist", "cifar-10", "a", "Fashion_MNIST", "0day"] {
            check_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("-x", "not valid"),
            ("a b", "not valid"),
            ("a/b", "not valid"),
            ("a.b", "not valid"),
            ("a=b", "not valid"),
            ("é", "not valid"),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_name(&"a".repeat(65)).unwrap_err().contains("longer"));
    }
}
