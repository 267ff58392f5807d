export function greet() {
  document.querySelector('#greeting').textContent = 'kiln example app OK';
}
