from peftplan.cli import main

main()
