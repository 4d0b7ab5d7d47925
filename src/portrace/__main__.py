from portrace.launch import main

main()
