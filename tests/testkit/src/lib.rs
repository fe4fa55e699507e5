//! Helpers for end-to-end tests on a real control plane.
//!
//! [`Cluster::shared`] connects every test of a process to one control plane:
//! the one named by `KCO_TEST_KUBECONFIG` (as `hack/test.sh` provides), or one
//! that this crate starts with `hack/control-plane.sh` and that is torn down
//! when the test process exits. The helpers around it run kubectl, create
//! throw-away namespaces, start the operator binary and wait for conditions
//! without fixed sleeps.

mod cluster;
mod kstatus;
mod namespace;
mod operator;
mod paths;
mod wait;

pub use anyhow::{self, Result};
pub use cluster::{Cluster, Output, client_from_kubeconfig};
pub use kstatus::kstatus;
pub use namespace::{TEMPORARY_LABEL, TempNamespace};
pub use operator::{Operator, ResourceUsage};
pub use paths::{repo_root, tools_bin};
pub use wait::{wait_condition, wait_until};
