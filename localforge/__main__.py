from localforge.cli import main

main()
