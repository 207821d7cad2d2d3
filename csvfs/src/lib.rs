//! csvfs node daemon. Owns the FUSE mount of a shared volume on one node: the metadata
//! client side (requests to the coordinator, kernel cache invalidations from it), the
//! direct data path to the LUN (extent maps, allocation, batched commits), the metadata
//! server it hosts when it holds the coordinator lease, `csvfs state`, and the demo
//! cluster. It does not define the on-disk format or the protocol (metadata-server) or
//! talk to the LUN except through `block_client::BlockDevice`.
//! Main types: [`fuse::CsvFs`], [`data::DataPath`], [`config::MountConfig`].
//! Spec: ../shared/DESIGN.md (csvfs).
#![forbid(unsafe_code)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
mod demo_vm;
pub mod errno;
pub mod extents;
pub mod fuse;
pub mod helper;
pub mod local;
pub mod meta;
pub mod mount;
pub mod output;
pub mod state;
