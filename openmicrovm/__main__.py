from openmicrovm.cli import main

main()
