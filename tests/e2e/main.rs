//! End-to-end tests: the operator binary as a separate process, a real
//! etcd, kube-apiserver and kube-controller-manager, and the stand-in
//! Mixpanel and Kameleoon servers. Each test gets its own namespace, its own
//! stand-ins and its own operator process watching only that namespace.

mod failure_support;
mod support;

mod admission;
mod chart;
mod connection;
mod dynamic;
mod failures;
mod field_cases;
mod one_time;
mod operations;
