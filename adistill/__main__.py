from adistill.cli import main

raise SystemExit(main())
