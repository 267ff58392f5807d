import Alpine from 'alpinejs';
import { greet } from './greet.js';

window.Alpine = Alpine;
Alpine.start();
document.addEventListener('DOMContentLoaded', () => greet());
