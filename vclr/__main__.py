from vclr.cli import main

raise SystemExit(main())
