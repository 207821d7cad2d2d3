//! hv-runner: a small KVM VM runner that keeps each VM in its own folder of a volume and
//! live-migrates running VMs between nodes. It uses the volume only through paths.
//! Spec: ../shared/DESIGN.md (hv-runner) and MIGRATION.md.

fn main() {}
