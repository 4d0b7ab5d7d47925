from portrace.cli import main

main()
