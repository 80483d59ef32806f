"""Storage: size-limited disks (loop-mounted ext4 images), snapshots, volumes and backups."""
