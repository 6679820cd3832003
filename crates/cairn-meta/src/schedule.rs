//! Replica placement: which nodes and disks a volume's replicas go to (no I/O).
