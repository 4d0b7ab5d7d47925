"""portrace: names what blocks a port the moment bind(), listen() or connect() fails.
Packages, in import order: events, errors; kernel; observe; judge; output; pipeline; commands."""
