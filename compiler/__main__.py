from cfsc.cli import main

main()
