"""What a user runs: the click CLI and its argument types, `check`, `lab`, `demo`, and the
staged roles (real processes holding real sockets) that demo, lab and the tests share."""
