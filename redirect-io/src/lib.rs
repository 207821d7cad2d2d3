//! Redirected I/O. Will own a `BlockDevice` that forwards data I/O through the coordinator
//! when a node loses its own path to the LUN, and the coordinator-side executor that serves
//! those requests on its path. Not built yet: the direct path is the only path so far.
//! Spec: ../shared/DESIGN.md (Redirected I/O).
#![forbid(unsafe_code)]
