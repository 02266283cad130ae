"""Binary size units."""

KiB, MiB = 1 << 10, 1 << 20
